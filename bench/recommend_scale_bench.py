"""Recommend at catalogue scale: embedding, ANN index build, query time and recall against brute force.

A synthetic catalogue of --items distinct item texts is made from real MovieLens texts (each item
pairs two real titles, with the genres and tags of both: "Heat meets Up (1995). Action, Crime,
Animation. Tags: ..."), and --users users each liking 5-15 items of one genre plus a few others
they rated; their profiles are built as ``recommend`` builds them (latest positives' titles).
Timed, one stage after the other, in one process:

  embed items     all-MiniLM-L6-v2 exported as a sentence encoder (ONNX, --max-length tokens),
                  through the item-vector cache (tasks.ranking.item_vectors), then the cache reread
  embed profiles  the users' profile texts (cached the same way, so a rerun over the same data skips both)
  build index     per --index kind: faiss build + the recall gate (recall@10 on 1000 held-out items
                  and 1000 of the profiles, as recommend gates it)
  query           top-10 for every user, rated items excluded (tasks.ranking.neighbours); not run for an
                  index its gate refused (recommend answers exactly then: the brute-force row)
  brute force     the exact matrix product (what recommend did before) on --brute-users users,
                  extrapolated to all users; recall@10 of each index on those users is against it

Peak RSS is read after every stage. Results: bench/results/recommend_scale_<items>x<users>.json.

    .venv/bin/python bench/recommend_scale_bench.py --items 50000 --users 5000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere (finetune_flows itself comes from the install)
    sys.path.insert(0, str(REPO))

MOVIELENS = REPO.parent / "shared" / "datasets" / "movielens_latest_small"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def parse_item(text: str) -> tuple[str, str, list[str], list[str]]:
    """(title without year, year, genres, tags) of a MovieLens item text."""
    parts = text.split(". ")
    title, year = parts[0], ""
    if title.endswith(")") and "(" in title:
        title, year = title[: title.rindex("(")].strip(), title[title.rindex("(") + 1 : -1]
    genres = parts[1].split(", ") if len(parts) > 1 and not parts[1].startswith("Tags:") else []
    tags = next((p.removeprefix("Tags: ").split(", ") for p in parts[1:] if p.startswith("Tags: ")), [])
    return title, year, [g for g in genres if g and g != "(no genres listed)"], tags


def synthetic_catalogue(texts: list[str], n: int, seed: int) -> tuple[list[str], dict[str, np.ndarray]]:
    """``n`` distinct item texts, each from two real items, and the rows of the items of each genre."""
    parsed = [parse_item(t) for t in texts]
    m = len(parsed)
    rng = np.random.default_rng(seed)
    codes = np.unique(rng.integers(0, m * m, size=int(n * 1.1) + 10))
    codes = codes[(codes // m) != (codes % m)]
    codes = rng.permutation(codes)[:n]
    if len(codes) < n:
        raise SystemExit(f"only {len(codes)} distinct pairs of {m} items; ask for fewer --items")
    out: list[str] = []
    by_genre: dict[str, list[int]] = {}
    for row, code in enumerate(codes.tolist()):
        (ta, ya, ga, xa), (tb, _, gb, xb) = parsed[code // m], parsed[code % m]
        genres = list(dict.fromkeys(ga + gb))
        tags = list(dict.fromkeys(xa[:2] + xb[:2]))
        text = f"{ta} meets {tb}" + (f" ({ya})" if ya else "") + (f". {', '.join(genres)}" if genres else "")
        out.append(text + (f". Tags: {', '.join(tags)}" if tags else ""))
        for genre in genres:
            by_genre.setdefault(genre, []).append(row)
    return out, {g: np.array(rows) for g, rows in by_genre.items()}


def synthetic_users(
    items: list[str], by_genre: dict[str, np.ndarray], users: int, seed: int
) -> tuple[list[str], list[np.ndarray]]:
    """(profile text, rated item rows) per user: 5-15 liked items of one genre, newest first, plus 0-10 others."""
    from finetune_flows.tasks.ranking.split import profile_text, short_title

    rng = np.random.default_rng(seed + 1)
    genres = [g for g, rows in by_genre.items() if len(rows) >= 50]
    profiles, rated = [], []
    for _ in range(users):
        pool = by_genre[genres[rng.integers(len(genres))]]
        liked = rng.choice(pool, size=int(rng.integers(5, 16)), replace=False)
        others = rng.choice(len(items), size=int(rng.integers(0, 11)), replace=False)
        profiles.append(profile_text([short_title(items[i]) for i in liked[:10]]))
        rated.append(np.unique(np.concatenate([liked, others])))
    return profiles, rated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--index", choices=["hnsw", "ivf", "both"], default="both")
    parser.add_argument("--brute-users", type=int, default=2000, help="users searched by brute force (a sample)")
    parser.add_argument("--max-length", type=int, default=64, help="token limit of the exported encoder")
    parser.add_argument("--data", type=Path, default=None, help="MovieLens folder (default: the shared full one)")
    parser.add_argument("--work", type=Path, default=None, help="keep caches here (default: a temporary folder)")
    parser.add_argument(
        "--onnx",
        type=Path,
        help="a sentence-encoder graph to embed with (e.g. the export ladder's served variant of a recommendation "
        "model); default: all-MiniLM-L6-v2 exported here in fp32",
    )
    parser.add_argument("--tokenizer", type=Path, help="the --onnx graph's tokenizer.json (default: MiniLM's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from finetune_flows.tasks.core.model_source import minilm_path
    from finetune_flows.tasks.export.model_export import export_sentence_encoder
    from finetune_flows.tasks.ranking.ann_index import SearchOptions, build_neighbours
    from finetune_flows.tasks.ranking.dataset import interaction_folder
    from finetune_flows.tasks.ranking.interactions import read_interactions
    from finetune_flows.tasks.ranking.item_vectors import item_vectors
    from finetune_flows.tasks.ranking.neighbours import exact_search
    from finetune_flows.tasks.ranking.recommending import SCORE_SCALE
    from finetune_flows.tasks.serving.encoder import SentenceEncoder

    folder = args.data or (MOVIELENS if MOVIELENS.is_dir() else interaction_folder(None, "recommendation"))
    stages: dict[str, dict[str, Any]] = {}

    def stage(name: str, seconds: float, count: int, **extra: Any) -> None:
        stages[name] = {"seconds": round(seconds, 2), "per_second": round(count / seconds, 1) if seconds else None}
        stages[name] |= {"peak_rss_gib": round(peak_rss_gib(), 2), **extra}
        print(
            f"  {name:<24}{seconds:>9.1f} s  {count / max(seconds, 1e-9):>10.0f} /s  peak RSS {peak_rss_gib():.2f} GiB"
        )

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        start = time.perf_counter()
        source = list(read_interactions(folder).items["text"])
        items, by_genre = synthetic_catalogue(source, args.items, args.seed)
        profiles, rated = synthetic_users(items, by_genre, args.users, args.seed)
        stage("build data", time.perf_counter() - start, args.items, source_items=len(source))
        print(f"  e.g. item: {items[0]!r}\n       profile: {profiles[0]!r}")

        onnx = args.onnx or export_sentence_encoder(
            minilm_path(), work / f"minilm-{args.max_length}.onnx", max_length=args.max_length
        )
        encoder = SentenceEncoder(onnx, args.tokenizer or minilm_path() / "tokenizer.json")
        print(f"  encoder: {onnx} (max length {encoder.max_length})")
        start = time.perf_counter()
        vectors, embedded = item_vectors(encoder, items, work / "embeddings")
        stage("embed items", time.perf_counter() - start, args.items, embedded=embedded.embedded)
        start = time.perf_counter()
        _, reread = item_vectors(encoder, items, work / "embeddings")
        stage("reread item cache", time.perf_counter() - start, args.items, cached=reread.cached)
        start = time.perf_counter()
        queries, profile_stats = item_vectors(encoder, profiles, work / "profiles")  # cached like items, for reruns
        stage("embed profiles", time.perf_counter() - start, args.users, embedded=profile_stats.embedded)

        sample = np.sort(np.random.default_rng(args.seed).choice(args.users, min(args.brute_users, args.users), False))
        start = time.perf_counter()
        truth = exact_search(vectors, queries[sample], 10, [rated[i] for i in sample], SCORE_SCALE)
        brute = time.perf_counter() - start
        stage("brute force (sample)", brute, len(sample), all_users_seconds=round(brute * args.users / len(sample), 1))

        kinds = ["hnsw", "ivf"] if args.index == "both" else [args.index]
        for kind in kinds:
            start = time.perf_counter()
            options = SearchOptions(ann_min_items=1, index=kind)
            neighbours, report = build_neighbours(vectors, options, work / "index", queries)  # as recommend does
            stage(f"build {kind}", time.perf_counter() - start, args.items, report=report.model_dump())
            if report.kind == "exact":  # refused by its gate: recommend would answer exactly, i.e. brute force
                continue
            start = time.perf_counter()
            found = neighbours.search(queries, 10, rated, SCORE_SCALE)
            stage(f"query {kind} (all users)", time.perf_counter() - start, args.users)
            hits = [
                len(np.intersect1d(found[i][0], want)) / max(len(want), 1)
                for i, (want, _) in zip(sample, truth, strict=True)
            ]
            stages[f"query {kind} (all users)"]["recall_at_10_vs_brute_force"] = round(float(np.mean(hits)), 4)
            del neighbours, found

    print(f"\nrecommend at scale: {args.items} items x {args.users} users, MiniLM, max_length {args.max_length}")
    print(f"{'stage':<26}{'seconds':>10}{'per second':>12}{'peak RSS GiB':>14}  notes")
    for name, s in stages.items():
        notes = ""
        if "report" in s:
            r = s["report"]
            notes = (
                f"{r['kind']} {r['params']} gate recall@10: held-out items {r['item_recall_at_10']:.4f}, "
                f"{r['real_queries']} profiles {r['query_recall_at_10']:.4f}"
            )
            if r["kind"] == "exact":
                notes = f"REFUSED by the gate, recommend answers exactly: {r['note']}"
        elif "recall_at_10_vs_brute_force" in s:
            notes = f"recall@10 vs brute force on {len(sample)} users: {s['recall_at_10_vs_brute_force']:.4f}"
        elif "all_users_seconds" in s:
            notes = f"{len(sample)} users; all {args.users} users: ~{s['all_users_seconds']:.0f} s"
        print(f"{name:<26}{s['seconds']:>10.1f}{s['per_second'] or 0:>12.0f}{s['peak_rss_gib']:>14.2f}  {notes}")
    out = args.out or REPO / "bench" / "results" / f"recommend_scale_{args.items}x{args.users}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "data": str(folder),
        "items": args.items,
        "users": args.users,
        "max_length": args.max_length,
        "encoder": str(args.onnx) if args.onnx else "all-MiniLM-L6-v2, fp32, exported here",
        "brute_force_users": len(sample),
    }
    out.write_text(json.dumps({**meta, "stages": stages}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
