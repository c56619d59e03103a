"""Rebuild the bundled sample datasets from the originals in ../shared/datasets.

    python docs/make_samples.py [--shared ../shared/datasets] [--sst2-rows 20000]

SST-2: a seeded random sample of the training TSV (rows kept byte for byte) and all 872 dev rows.
"""

from __future__ import annotations

import argparse
import hashlib
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2_OUT = ROOT / "plugins" / "scenarios" / "data" / "sst2_sample"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--sst2-rows", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sst2(args.shared, args.sst2_rows, args.seed)


if __name__ == "__main__":
    main()
