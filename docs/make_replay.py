"""Build the replay news stream of the ``monitor`` demo from held-back Financial PhraseBank sentences.

    python docs/make_replay.py [--replay-seed N] [--background 450] [--out FOLDER]

Only sentences of the FinBERT-protocol *test* split are used, built exactly as the ``finetune``
flow builds it for scenario ``finance-monitoring`` (same file, fractions and seed 42), so the
champion model has never trained, early-stopped or been promoted on any of them.

The stream covers five weekdays (UTC). Days 1-5 carry a seeded sample of the natural mix of test
sentences at business-hour-weighted times. On day 5 one topic turns negative: every negative
test sentence about layoffs and restructuring (``LAYOFF_RULE`` below) is held out of the
background and released inside ``SPIKE_HOURS``. The monitor judges a window against the windows
before it, so the topic gets a calm run-up: the non-negative sentences about the workforce
(``LAYOFF_RULE`` or ``WORKFORCE_RULE``) arrive in ``CONTEXT_HOURS`` of day 5, just before the
spike. One CSV per day (``timestamp,source,text``), plus a README.md with the counts, both
rewritten on every run; the output is the same for the same seeds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere (finetune_flows itself comes from the install)
    sys.path.insert(0, str(ROOT))

SCENARIO = "finance-monitoring"
DEFAULT_OUT = ROOT / "plugins" / "scenarios" / "data" / "financial_phrasebank" / "replay"
FIRST_DAY = dt.date(2024, 6, 3)  # a Monday; days 1-5 are Monday to Friday
DAYS = 5
SPIKE_DAY = DAYS
SPIKE_HOURS = (10, 12)  # UTC, [start, end)
CONTEXT_HOURS = (4, 10)  # UTC: the topic's calm run-up on the spike day
# Chosen among the first few seeds: with it, the monitor's default rule flags only the spike (see README).
REPLAY_SEED = 3
SPIKE_TOPIC = "layoffs and restructuring"

# A sentence is about layoffs and restructuring when any of these (case-insensitive) matches.
# A bare "cut" is not enough ("target has been cut to EUR 4.85"): cuts and reductions count
# only when the sentence also names jobs, staff or people.
LAYOFF_RULE = (
    r"\blay-?offs?\b",
    r"\blaid off\b",
    r"redundan",
    r"\bjobs?\b",
    r"restructur",
    r"\bpersonnel (?:negotiations|reductions?|cuts?)\b",
    r"\bworkforce\b",
    r"\bheadcount\b",
    r"\b(?:cut|cuts|cutting|reduce|reduces|reducing|reduction|reductions)\b[^.]*"
    r"\b(?:jobs?|staff|employees|workers|people|positions|personnel)\b",
    r"\bterminat\w*\b[^.]*\bemployment\b",
)
LAYOFF = re.compile("|".join(f"(?:{p})" for p in LAYOFF_RULE), re.IGNORECASE)
# Workforce news in general (headcounts, negotiations, reorganisations, retirements): with
# LAYOFF_RULE, it picks the non-negative sentences of the run-up.
WORKFORCE_RULE = (
    r"\bemploy(?:ees?|ment|er-employee)\b",
    r"\bstaff\b",
    r"\bpersonnel\b",
    r"\bpeople\b",
    r"\bpositions\b",
    r"\breductions?\b",
    r"\bnegotiations\b",
    r"\breorgani[sz]",
    r"\brationali[sz]",
    r"\bretir",
    r"\bpension arrangements\b",
    r"\bcost savings\b",
    r"\bgiven notice\b",
)
WORKFORCE = re.compile("|".join(f"(?:{p})" for p in LAYOFF_RULE + WORKFORCE_RULE), re.IGNORECASE)

# Invented outlets and how much of the background each carries.
SOURCES = {"wire-a": 0.40, "wire-b": 0.25, "exchange-filings": 0.25, "press-releases": 0.10}
SPIKE_SOURCES = {"wire-a": 0.5, "exchange-filings": 0.5}
# Hour-of-day weights (UTC): news flow peaks in Helsinki/London business hours, with a thin night.
HOUR_WEIGHTS = np.array([1, 1, 1, 1, 2, 4, 8, 10, 10, 10, 10, 9, 9, 9, 8, 7, 6, 4, 3, 2, 2, 1, 1, 1], dtype=float)


def test_split(seed: int) -> pd.DataFrame:
    """The held-back test split of the bundled PhraseBank sample (columns text, label), as the flow builds it."""
    from finetune_flows.plugins import SCENARIOS
    from finetune_flows.tasks.core.config import FinetuneConfig
    from finetune_flows.tasks.core.ingestion import IngestOptions, ingest_files

    config = FinetuneConfig.for_scenario(SCENARIO, {"training.seed": seed})
    scenario = SCENARIOS.get(SCENARIO)
    options = IngestOptions(
        eval_fraction=config.data.eval_fraction,
        test_fraction=config.data.test_fraction,
        seed=config.training.seed,
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = ingest_files(scenario.sample().train, None, scenario, options, Path(tmp) / "cache")
        return pd.read_parquet(Path(result.dataset_dir) / "test.parquet", columns=["text", "label"])


def _times(rng: np.random.Generator, day: int, n: int, hours: tuple[int, int] | None = None) -> list[pd.Timestamp]:
    """``n`` seeded times on ``day`` (1-based): hour by ``HOUR_WEIGHTS``, or uniform inside ``hours``."""
    start = pd.Timestamp(FIRST_DAY + dt.timedelta(days=day - 1), tz="UTC")
    if hours is None:
        hour = rng.choice(24, size=n, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
        seconds = hour * 3600 + rng.integers(0, 3600, size=n)
    else:
        seconds = rng.integers(hours[0] * 3600, hours[1] * 3600, size=n)
    return [start + pd.Timedelta(seconds=int(s)) for s in seconds]


def _sources(rng: np.random.Generator, n: int, weights: dict[str, float]) -> list[str]:
    names = list(weights)
    p = np.array([weights[name] for name in names])
    return [names[i] for i in rng.choice(len(names), size=n, p=p / p.sum())]


def build_stream(test: pd.DataFrame, background: int, seed: int) -> pd.DataFrame:
    """Rows ``day, timestamp, source, text, label, part``; part is background, run-up or spike."""
    rng = np.random.default_rng(seed)
    negative = test["label"] == "negative"
    spike = test[test["text"].map(lambda text: LAYOFF.search(text) is not None) & negative]
    run_up = test[test["text"].map(lambda text: WORKFORCE.search(text) is not None) & ~negative]
    rest = test.drop(spike.index).drop(run_up.index)
    if background > len(rest):
        raise SystemExit(f"--background {background} is more than the {len(rest)} test sentences left for it")

    # Background: a seeded sample of the natural mix, dealt out evenly over the days.
    chosen = rest.iloc[rng.permutation(len(rest))[:background]]
    days = np.arange(background) % DAYS + 1
    parts = []
    for day in range(1, DAYS + 1):
        part = chosen[days == day]
        times, sources = _times(rng, day, len(part)), _sources(rng, len(part), SOURCES)
        parts.append(part.assign(day=day, timestamp=times, source=sources, part="background"))
    # The spike day: the topic's calm run-up, then its negative burst.
    for frame, name, hours, weights in (
        (run_up, "run-up", CONTEXT_HOURS, SOURCES),
        (spike, "spike", SPIKE_HOURS, SPIKE_SOURCES),
    ):
        times, sources = _times(rng, SPIKE_DAY, len(frame), hours), _sources(rng, len(frame), weights)
        parts.append(frame.assign(day=SPIKE_DAY, timestamp=times, source=sources, part=name))
    stream = pd.concat(parts, ignore_index=True)
    return stream.sort_values(["timestamp", "text"], kind="stable").reset_index(drop=True)


def write_stream(stream: pd.DataFrame, out: Path) -> list[Path]:
    """One ``dayN.csv`` per day with columns timestamp (ISO 8601, UTC), source, text."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("day*.csv"):
        old.unlink()
    files = []
    for day, part in stream.groupby("day"):
        path = out / f"day{day}.csv"
        frame = part.assign(timestamp=part["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
        frame[["timestamp", "source", "text"]].to_csv(path, index=False, encoding="utf-8", lineterminator="\n")
        files.append(path)
    return files


def readme(stream: pd.DataFrame, split_seed: int, replay_seed: int, test_rows: int) -> str:
    """The replay folder's README: provenance, licence, rules, spike and per-day counts."""
    counts = pd.crosstab(stream["day"], stream["label"]).reindex(columns=["negative", "neutral", "positive"])
    parts = pd.crosstab(stream["day"], stream["part"]).reindex(columns=["background", "run-up", "spike"], fill_value=0)
    rows = []
    for day, row in counts.iterrows():
        date = FIRST_DAY + dt.timedelta(days=int(day) - 1)
        rows.append(
            f"| day{day}.csv | {date:%a %Y-%m-%d} | {int(row.sum())} | {row['negative']} | {row['neutral']} "
            f"| {row['positive']} | {parts.loc[day, 'run-up']} | {parts.loc[day, 'spike']} |"
        )
    spike = stream[stream["part"] == "spike"]
    run_up = stream[stream["part"] == "run-up"]
    spike_date = FIRST_DAY + dt.timedelta(days=SPIKE_DAY - 1)
    layoff_rule = "\n".join(f"    {pattern}" for pattern in LAYOFF_RULE)
    workforce_rule = "\n".join(f"    {pattern}" for pattern in WORKFORCE_RULE)
    return f"""# Replay stream for the `monitor` demo

A replay, not live news: {len(stream)} news items made of **held-back Financial PhraseBank test
sentences**, with invented timestamps and sources. Built by `docs/make_replay.py` (replay seed
{replay_seed}); rerun it to rebuild these files byte for byte:

    .venv/bin/python docs/make_replay.py --replay-seed {replay_seed}

Source text: Financial PhraseBank v1.0, `Sentences_50Agree.txt`, Pekka Malo, Ankur Sinha, Pyry Takala,
Pekka Korhonen and Jyrki Wallenius (2014), "Good debt or bad debt: Detecting semantic orientations in
economic texts", JASIST. License: CC BY-NC-SA 3.0 (see `../License.txt`); this folder is under the same
license, non-commercial use only. Sentences are unchanged (including the original's encoding slips).

## Which sentences

Only the FinBERT-protocol **test** split that the `finetune` flow holds back for scenario
`finance-monitoring`: stratified 20 % test, then 20 % of the rest as validation, seed {split_seed}, built by
`tasks.core.ingestion.ingest_files` exactly as the flow does ({test_rows} test sentences). A model trained by
the flow on the bundled sample has never seen, early-stopped on, or been promoted on any of them.

## Files

One CSV per day, columns `timestamp` (ISO 8601, UTC, `Z`), `source`, `text`, sorted by time. Sources are
invented outlets: {", ".join(f"`{s}`" for s in SOURCES)}. Background times follow a business-hours
profile (UTC). The gold labels are not in the files (the monitor scores raw text); the counts below
use them.

| file | date | items | negative | neutral | positive | run-up items | spike items |
|---|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

## The spike

Topic **{SPIKE_TOPIC}** turns negative on day {SPIKE_DAY} (`day{SPIKE_DAY}.csv`, {spike_date:%Y-%m-%d}): all
{len(spike)} negative test sentences about layoffs and restructuring arrive between
**{SPIKE_HOURS[0]:02d}:00 and {SPIKE_HOURS[1]:02d}:00 UTC** ({spike["timestamp"].min():%H:%M} to \
{spike["timestamp"].max():%H:%M}), from {" and ".join(f"`{s}`" for s in SPIKE_SOURCES)}, on top of the
usual flow. None of them occurs anywhere else in the stream.

The monitor judges a window against the windows before it, and only those that hold texts of the
topic. So the topic gets a calm run-up: the {len(run_up)} neutral and positive test sentences about the
workforce (headcounts, negotiations, reorganisations, retirements) arrive between
{CONTEXT_HOURS[0]:02d}:00 and {CONTEXT_HOURS[1]:02d}:00 UTC the same day.

What the monitor should flag: the monitor's default spike rule (60-minute windows, a baseline of the
6 windows before, at least 3 of them non-empty, k = 2, margin 0.1, at least 5 texts), applied to
these files with the *gold* labels and the topics that the shipped taxonomy (`../topics.json`,
all-MiniLM-L6-v2) assigns, flags `layoffs_restructuring` in the {SPIKE_HOURS[0]:02d}:00 and
{SPIKE_HOURS[0] + 1:02d}:00 windows of day {SPIKE_DAY} and nothing else. The replay seed was picked for that
among the first few seeds: with small hourly volumes, a chance cluster of negatives in some other
topic also alerts under other seeds (seed 42 adds an `earnings` alert at 10:00 on day 5), as it
would in real news. A fine-tuned model's labels differ from the gold ones here and there, so a real
run may show an extra alert or a different share.

Spike rule (`LAYOFF_RULE` in `docs/make_replay.py`): a sentence is about layoffs and restructuring
when any of these regular expressions matches it, case-insensitively, and its label is `negative`. A
bare "cut" does not count ("target has been cut to EUR 4.85"); cuts and reductions count only next to
jobs, staff or people:

{layoff_rule}

Run-up rule: `LAYOFF_RULE` or any of these (`WORKFORCE_RULE`) matches, and the label is `neutral` or
`positive`:

{workforce_rule}

The background is a seeded random sample of the other {test_rows - len(spike) - len(run_up)} test
sentences (their natural label mix), dealt out evenly over the five days.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split-seed", type=int, default=42, help="seed of the test split (the flow's default)")
    parser.add_argument("--replay-seed", type=int, default=REPLAY_SEED, help="seed of sampling, times and sources")
    parser.add_argument("--background", type=int, default=450, help="background items over the five days")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    test = test_split(args.split_seed)
    stream = build_stream(test, args.background, args.replay_seed)
    for path, (_, part) in zip(write_stream(stream, args.out), stream.groupby("day"), strict=True):
        print(f"{path}: {len(part)} items")
    (args.out / "README.md").write_text(readme(stream, args.split_seed, args.replay_seed, len(test)), encoding="utf-8")
    spike = stream[stream["part"] == "spike"]
    print(
        f"{len(stream)} items from {len(test)} test sentences; spike: {len(spike)} negative "
        f"'{SPIKE_TOPIC}' items on day {SPIKE_DAY}, {spike['timestamp'].min():%H:%M}-"
        f"{spike['timestamp'].max():%H:%M} UTC"
    )


if __name__ == "__main__":
    main()
