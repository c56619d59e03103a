"""Rebuild the bundled sample datasets from the originals in ../shared/datasets.

    python docs/make_samples.py [--shared ../shared/datasets] [--sst2-rows 20000] [--only banking77]

SST-2: a seeded random sample of the training TSV (rows kept byte for byte) and all 872 dev rows.
Banking77: a seeded, stratified sample (the same number of rows per intent) of the train and test CSVs,
values unchanged, original order, plus the intent list.
MovieLens: every rating of a seeded random sample of users, the movies they rated and those
movies' tags (rows kept byte for byte, original order).
NLU++: the first folds of the banking domain (fold0.json ... fold3.json, copied byte for byte) and the ontology.
"""

from __future__ import annotations

import argparse
import hashlib
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2_OUT = ROOT / "plugins" / "scenarios" / "data" / "sst2_sample"
MOVIELENS_OUT = ROOT / "plugins" / "scenarios" / "data" / "movielens_sample"
BANKING77_OUT = ROOT / "plugins" / "scenarios" / "data" / "banking77_sample"
NLUPP_OUT = ROOT / "plugins" / "scenarios" / "data" / "nlupp_sample"


def sst2(shared: Path, rows: int, seed: int) -> None:
    source = shared / "sst2"
    header, *lines = (source / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    random.Random(seed).shuffle(lines)
    SST2_OUT.mkdir(parents=True, exist_ok=True)
    (SST2_OUT / "train.tsv").write_text(header + "".join(lines[:rows]), encoding="utf-8")
    (SST2_OUT / "dev.tsv").write_bytes((source / "dev.tsv").read_bytes())
    for name in ("train.tsv", "dev.tsv"):
        digest = hashlib.sha256((SST2_OUT / name).read_bytes()).hexdigest()
        print(f"{SST2_OUT / name}: sha256 {digest}")


def _keep(lines: list[str], column: int, keep: set[str]) -> str:
    return "".join(line for line in lines if line.split(",", 1 if column == 0 else 2)[column] in keep)


def movielens(shared: Path, users: int, seed: int) -> None:
    source = shared / "movielens_latest_small"
    header, *ratings = (source / "ratings.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    all_users = sorted({line.split(",", 1)[0] for line in ratings}, key=int)
    chosen = set(random.Random(seed).sample(all_users, users))
    kept = [line for line in ratings if line.split(",", 1)[0] in chosen]
    movie_ids = {line.split(",")[1] for line in kept}
    MOVIELENS_OUT.mkdir(parents=True, exist_ok=True)
    (MOVIELENS_OUT / "ratings.csv").write_text(header + "".join(kept), encoding="utf-8")
    movies_header, *movies = (source / "movies.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (MOVIELENS_OUT / "movies.csv").write_text(movies_header + _keep(movies, 0, movie_ids), encoding="utf-8")
    tags_header, *tags = (source / "tags.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (MOVIELENS_OUT / "tags.csv").write_text(tags_header + _keep(tags, 1, movie_ids), encoding="utf-8")
    for name in ("ratings.csv", "movies.csv", "tags.csv"):
        digest = hashlib.sha256((MOVIELENS_OUT / name).read_bytes()).hexdigest()
        print(f"{MOVIELENS_OUT / name}: sha256 {digest}")


def banking77(shared: Path, train_per_intent: int, eval_per_intent: int, seed: int) -> None:
    import pandas as pd

    source = shared / "banking77"
    BANKING77_OUT.mkdir(parents=True, exist_ok=True)
    for name, out, per_intent in (
        ("train.csv", "train.csv", train_per_intent),
        ("test.csv", "eval.csv", eval_per_intent),
    ):
        frame = pd.read_csv(source / name, dtype=str, keep_default_na=False)
        picked = frame.groupby("category", sort=False).sample(n=per_intent, random_state=seed).sort_index()
        picked.to_csv(BANKING77_OUT / out, index=False)
    (BANKING77_OUT / "categories.json").write_bytes((source / "categories.json").read_bytes())
    (BANKING77_OUT / "LICENSE").write_bytes((source / "LICENSE").read_bytes())
    for name in ("train.csv", "eval.csv", "categories.json"):
        digest = hashlib.sha256((BANKING77_OUT / name).read_bytes()).hexdigest()
        print(f"{BANKING77_OUT / name}: sha256 {digest}")


def nlupp(shared: Path, folds: int) -> None:
    source = shared / "nlupp"
    (NLUPP_OUT / "banking").mkdir(parents=True, exist_ok=True)
    names = [f"banking/fold{index}.json" for index in range(folds)]
    for name in [*names, "ontology.json"]:
        (NLUPP_OUT / name).write_bytes((source / "data" / name).read_bytes())
    (NLUPP_OUT / "LICENSE").write_bytes((source / "LICENSE").read_bytes())
    for name in [*names, "ontology.json"]:
        digest = hashlib.sha256((NLUPP_OUT / name).read_bytes()).hexdigest()
        print(f"{NLUPP_OUT / name}: sha256 {digest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--sst2-rows", type=int, default=20000)
    parser.add_argument("--movielens-users", type=int, default=150)
    parser.add_argument("--banking77-train", type=int, default=20, help="training rows per intent")
    parser.add_argument("--banking77-eval", type=int, default=5, help="eval rows per intent (from the test split)")
    parser.add_argument("--nlupp-folds", type=int, default=4, help="banking folds fold0.json ... bundled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["sst2", "movielens", "banking77", "nlupp"], default=None)
    args = parser.parse_args()
    if args.only in (None, "sst2"):
        sst2(args.shared, args.sst2_rows, args.seed)
    if args.only in (None, "movielens"):
        movielens(args.shared, args.movielens_users, args.seed)
    if args.only in (None, "banking77"):
        banking77(args.shared, args.banking77_train, args.banking77_eval, args.seed)
    if args.only in (None, "nlupp"):
        nlupp(args.shared, args.nlupp_folds)


if __name__ == "__main__":
    main()
