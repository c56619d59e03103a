"""``finetune-flows score``: batch prediction with a registered model over a file or folder, into partitioned Parquet.

    finetune-flows score --model NAME [--alias champion] --input PATH --output DIR
                         [--engine local|dask] [--workers N] [--threads-per-worker N] [--address tcp://host:8786]
                         [--partition-rows N] [--text-column text]

``--workers`` or ``--address`` without ``--engine`` mean ``--engine dask``. A rerun with the same
input and output skips the parts already written. ``recommend`` takes the same engine options
(``add_engine_arguments``), with users as its records.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def cmd_score(args: argparse.Namespace) -> int:
    """Validate the options as a ``ScoreConfig``, run the ``score`` flow, print what it wrote."""
    from finetune_flows.flows.cli.main import _prepare_environment, run_flow
    from finetune_flows.tasks.core.config import validated

    values: dict[str, Any] = {"model_name": args.model, "input": args.input, "output": args.output}
    values.update(engine_values(args))
    optional = {"alias": args.alias, "text_column": args.text_column}
    values.update({key: value for key, value in optional.items() if value is not None})
    from finetune_flows.flows.score import ScoreConfig

    config = validated(ScoreConfig, values)
    _prepare_environment()
    from finetune_flows.flows.score import score

    run = run_flow(score, config)
    sys.stdout.write(
        f"\n=== finetune-flows: score run complete ===\n"
        f"model            : {run.model_uri} (version {run.model_version})\n"
        f"parts            : {run.parts} ({run.scored_parts} scored, {run.skipped_parts} already complete)\n"
        f"rows             : {run.rows} in {run.seconds:.1f} s on {config.engine.value}\n"
        f"output           : {run.output} (manifest {run.manifest})\n"
    )
    return 0


def add_score_parser(commands: Any) -> None:
    """Add the ``score`` sub-command to ``commands`` (argparse sub-parsers)."""
    scoring = commands.add_parser("score", help="batch prediction with a registered model into partitioned Parquet")
    scoring.add_argument("--model", required=True, metavar="NAME", help="registered MLflow model")
    scoring.add_argument("--alias", help="alias of the version that scores (default champion)")
    scoring.add_argument("--input", required=True, metavar="PATH", help="a Parquet/CSV/JSONL file or a folder of them")
    scoring.add_argument(
        "--output", required=True, metavar="DIR", help="folder for part-<id>.parquet and manifest.json"
    )
    add_engine_arguments(scoring, "records")
    scoring.add_argument("--text-column", help="the column holding the texts (default text)")
    scoring.set_defaults(func=cmd_score)


def add_engine_arguments(parser: Any, records: str) -> None:
    """``--engine``, ``--workers``, ``--threads-per-worker``, ``--address``, ``--partition-rows`` (of ``records``)."""
    parser.add_argument("--engine", choices=["local", "dask"], help="local (default) or dask")
    parser.add_argument("--workers", type=int, help="dask: worker processes of the local cluster (default 2)")
    parser.add_argument("--threads-per-worker", type=int, help="dask: threads per worker (default 1)")
    parser.add_argument("--address", help="dask: scheduler address of an existing cluster, e.g. tcp://10.0.0.5:8786")
    parser.add_argument("--partition-rows", type=int, help=f"most {records} per partition (default 10000)")


def engine_values(args: argparse.Namespace) -> dict[str, Any]:
    """The engine fields given on the command line; ``--workers`` or ``--address`` alone mean ``engine=dask``."""
    engine = args.engine or ("dask" if args.workers or args.address else None)
    given = {
        "engine": engine, "workers": args.workers, "threads_per_worker": args.threads_per_worker,
        "address": args.address, "partition_rows": args.partition_rows,
    }  # fmt: skip
    return {key: value for key, value in given.items() if value is not None}
