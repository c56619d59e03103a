"""The ``finetune-flows`` command line.

    finetune-flows plugins
    finetune-flows run <scenario> [--data TRAIN [EVAL]] [--set key=value ...]
    finetune-flows run [<scenario>] --help          (every config field: type, default, bounds)
    finetune-flows resume <run folder | MLflow run id>
    finetune-flows pretrain [--set key=value ...]      (masked-LM training on unlabelled text)
    finetune-flows tune <scenario> [--trials N] [--study NAME] [--set key=value ...] [--space field=value ...]
    finetune-flows gc [--yes]
    finetune-flows recommend [--user ID ...] [--k 10] [--cold-start ITEMS.csv] [--workers N] [--address ...]
    finetune-flows score --model NAME --input PATH --output DIR [--workers N] [--address ...]  (score_command)
    finetune-flows route FILE [--set key=value ...]
    finetune-flows up | down | status

With nothing configured, Prefect and MLflow keep their state under ``.finetune-flows/``
(see ``tasks.core.settings``). ``plugins`` reads entry points only and never imports torch.
What a command prints once its flow has finished is written by ``output``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from finetune_flows.flows.cli.output import (
    write_monitor_summary,
    write_pretrain_summary,
    write_recommendations,
    write_routes,
    write_summary,
)
from finetune_flows.flows.cli.score_command import add_engine_arguments, add_score_parser, engine_values
from finetune_flows.flows.cli.settings_help import RunHelp

logger = logging.getLogger("finetune_flows.flows.cli.main")


def _prepare_environment() -> None:
    """Embedded defaults for Prefect, set before Prefect is imported; explicit settings win."""
    from finetune_flows.tasks.core.settings import get_settings

    settings = get_settings()
    os.environ.setdefault("PREFECT_HOME", str(settings.prefect_home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The embedded server's 20 s start-up limit is too short on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "finetune_flows")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_LOGGED_MODEL_TRACE", "false")


def cmd_plugins(_: argparse.Namespace) -> int:
    from finetune_flows.plugins import HEADS, SCENARIOS

    for registry in (HEADS, SCENARIOS):
        sys.stdout.write(f"{registry.kind}s ({registry.group}):\n")
        for name, plugin in registry.available().items():
            sys.stdout.write(f"  {name:<26} {plugin.description}\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from finetune_flows.tasks.core.config import FinetuneConfig, parse_overrides

    overrides = parse_overrides(args.set or [])
    if args.data:
        overrides["data.train_path"] = args.data[0]
        if len(args.data) > 1:
            overrides["data.eval_path"] = args.data[1]
    config = FinetuneConfig.for_scenario(args.scenario, overrides)
    _prepare_environment()
    from finetune_flows.flows.finetune import finetune

    write_summary(run_flow(finetune, config))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    _prepare_environment()
    from finetune_flows.flows.finetune import finetune
    from finetune_flows.tasks.core.config import parse_overrides
    from finetune_flows.tasks.core.resuming import resume_config

    write_summary(run_flow(finetune, resume_config(args.run, parse_overrides(args.set or []))))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from finetune_flows.tasks.core.config import parse_overrides, validated
    from finetune_flows.tasks.tuning.config import TuneConfig

    values: dict[str, Any] = {"scenario": args.scenario, "overrides": args.set or []}
    values.update(space=parse_overrides(args.space or []), study_name=args.study, register_best=not args.no_register)
    limits = (("n_trials", args.trials), ("timeout_minutes", args.timeout_minutes))
    values.update({key: value for key, value in limits if value is not None})
    config = validated(TuneConfig, values)
    _prepare_environment()
    from finetune_flows.flows.tune import tune

    summary = run_flow(tune, config)
    sys.stdout.write(
        f"\n=== finetune-flows: study {summary.study_name} ({summary.study_file}) ===\n"
        f"trials           : {summary.trials_run} run now; {summary.complete} complete, {summary.pruned} pruned, "
        f"{summary.failed} failed in all\n"
        f"best             : trial {summary.best_trial}, eval {summary.metric} {summary.best_value:.4f}\n"
        + "".join(f"  {key} = {value}\n" for key, value in summary.best_values.items())
    )
    if summary.finetune is not None:
        write_summary(summary.finetune)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from finetune_flows.tasks.core.config import parse_overrides, set_dotted, validated
    from finetune_flows.tasks.pretraining.config import PretrainConfig

    values: dict[str, Any] = {}
    for key, value in parse_overrides(args.set or []).items():
        set_dotted(values, key, value)
    config = validated(PretrainConfig, values)
    _prepare_environment()
    from finetune_flows.flows.pretrain import pretrain

    write_pretrain_summary(run_flow(pretrain, config))
    return 0


def run_flow(flow: Any, *args: Any) -> Any:
    """Call ``flow`` against the configured Prefect server, or a temporary one that ends with this command."""
    from finetune_flows.flows.cli.embedded import temporary_server
    from finetune_flows.tasks.core.settings import get_settings

    with temporary_server(get_settings().prefect_home):
        return flow(*args)


def cmd_gc(args: argparse.Namespace) -> int:
    from finetune_flows.tasks.core.housekeeping import free_run_folders, human_size, survey_run_folders
    from finetune_flows.tasks.core.settings import get_settings

    settings = get_settings()
    folders = survey_run_folders(settings.runs_dir, settings.tracking_uri, min_age_s=args.min_age_hours * 3600)
    out = sys.stdout
    for folder in folders:
        why = folder.keep_reason or (
            f"run {folder.run_id} {folder.status}, no model version" if folder.run_id else "no MLflow run names it"
        )
        out.write(
            f"{'keep' if folder.keep_reason else 'free'}  {human_size(folder.size):>9}  {folder.path.name}  {why}\n"
        )
    unused = [folder for folder in folders if folder.reclaimable]
    total = sum(folder.size for folder in unused)
    if args.yes:
        freed = free_run_folders(unused)
        out.write(
            f"freed {human_size(freed)} from {len(unused)} of {len(folders)} run folders in {settings.runs_dir}\n"
        )
    else:
        out.write(
            f"{len(unused)} of {len(folders)} run folders in {settings.runs_dir} are used by no model version: "
            f"{human_size(total)}{'; `finetune-flows gc --yes` frees them' if unused else ''}\n"
        )
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from finetune_flows.tasks.core.config import parse_overrides, validated
    from finetune_flows.tasks.ranking.recommending import RecommendConfig

    values = parse_overrides(args.set or [])
    values.update({"users": args.user or [], "k": args.k, **engine_values(args)})
    if args.cold_start:
        values["cold_start_items"] = args.cold_start
    if args.data:
        values["data_path"] = args.data
    config = validated(RecommendConfig, values)
    _prepare_environment()
    from finetune_flows.flows.recommend import recommend

    write_recommendations(run_flow(recommend, config))
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from finetune_flows.tasks.core.config import parse_overrides, validated
    from finetune_flows.tasks.monitoring.scoring import MonitorConfig

    config = validated(MonitorConfig, {"source": args.source, **parse_overrides(args.set or [])})
    _prepare_environment()
    from finetune_flows.flows.monitor import monitor

    write_monitor_summary(run_flow(monitor, config), config)
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from finetune_flows.tasks.core.config import parse_overrides, validated
    from finetune_flows.tasks.routing.routing import RouteConfig

    config = validated(RouteConfig, {"source": args.source, **parse_overrides(args.set or [])})
    _prepare_environment()
    from finetune_flows.flows.route import route

    write_routes(run_flow(route, config))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    _prepare_environment()
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # `up` logs to its terminal
    from finetune_flows.flows.cli.services import up
    from finetune_flows.tasks.core.settings import get_settings

    record, started = up(get_settings(), auth=True if args.auth else None)
    sys.stdout.write(f"{'started' if started else 'already up'} (state {record.state_dir})\n")
    prefect_login = " (basic auth: PREFECT_API_AUTH_STRING)" if record.auth else ""
    mlflow_login = " (basic auth: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)" if record.auth else ""
    sys.stdout.write(f"Prefect UI : {record.prefect_url}{prefect_login}\n")
    sys.stdout.write(f"MLflow UI  : {record.mlflow_url}{mlflow_login}\n")
    return 0


def cmd_down(_: argparse.Namespace) -> int:
    from finetune_flows.flows.cli.services import down
    from finetune_flows.tasks.core.settings import get_settings

    stopped = down(get_settings())
    sys.stdout.write(f"stopped: {', '.join(f'{s.name} (pid {s.pid})' for s in stopped)}\n" if stopped else "not up\n")
    return 0


def cmd_status(_: argparse.Namespace) -> int:
    from finetune_flows.flows.cli.services import read_record, status
    from finetune_flows.tasks.core.settings import get_settings

    found = status(get_settings())
    if not found:
        sys.stdout.write("not up\n")
        return 3
    for s in found:
        health = "" if s.healthy is None else (" healthy" if s.healthy else " NOT healthy")
        where = f" {s.service.url}" if s.service.url else ""
        state = "running" if s.alive else "NOT running"
        sys.stdout.write(f"{s.service.name:<16} pid {s.service.pid:<8} {state}{health}{where}  log {s.service.log}\n")
    record = read_record(get_settings())
    assert record is not None
    ok = all(s.alive and s.healthy is not False for s in found)
    sys.stdout.write(f"{'up' if ok else 'DEGRADED'}: Prefect UI {record.prefect_url}, MLflow UI {record.mlflow_url}\n")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-flows", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("plugins", help="list heads and scenarios").set_defaults(func=cmd_plugins)
    run = commands.add_parser(
        "run",
        help="fine-tune, evaluate, export and register a model",
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "-h", "--help", action=RunHelp, help="show this help and every config field (with <scenario>: its defaults)"
    )
    run.add_argument("scenario", help="scenario name (see `finetune-flows plugins`)")
    run.add_argument("--data", nargs="+", metavar="FILE", help="training file, optionally followed by an eval file")
    run.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. training.epochs=2"
    )
    run.set_defaults(func=cmd_run)
    resume = commands.add_parser(
        "resume", help="continue a killed or failed run from its last complete checkpoint, with its own config"
    )
    resume.add_argument("run", help="the run folder's name (under <state>/runs), its path, or its MLflow run id")
    resume.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="change an export.*, evaluation.* or registration.* field"
    )
    resume.set_defaults(func=cmd_resume)
    tuning = commands.add_parser(
        "tune", help="search training hyperparameters with Optuna; train, register and gate the best"
    )
    tuning.add_argument("scenario", help="scenario name (see `finetune-flows plugins`)")
    tuning.add_argument("--trials", type=int, help="finished trials the study should hold (default 10)")
    tuning.add_argument("--study", metavar="NAME", help="study name; an existing study is resumed")
    tuning.add_argument("--timeout-minutes", type=float, help="start no new trial after this many minutes")
    tuning.add_argument("--set", action="append", metavar="KEY=VALUE", help="the base run's settings, as for run")
    tuning.add_argument(
        "--space", action="append", metavar="FIELD=VALUE", help="a search space field, e.g. learning_rate_high=3e-4"
    )
    tuning.add_argument("--no-register", action="store_true", help="report the best values only; train nothing more")
    tuning.set_defaults(func=cmd_tune)
    adapt = commands.add_parser(
        "pretrain", help="continue masked-LM training of the encoder on unlabelled text; register the adapted encoder"
    )
    adapt.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="a field, e.g. corpus.kind=file corpus.path=texts.csv"
    )
    adapt.set_defaults(func=cmd_pretrain)
    watch = commands.add_parser("monitor", help="score new texts with the champion and alert on negative spikes")
    watch.add_argument("source", help="a CSV/JSONL batch file (timestamp,source,text) or a folder of them")
    watch.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. window_minutes=30")
    watch.set_defaults(func=cmd_monitor)
    rec = commands.add_parser("recommend", help="top-k items per user from the champion recommender")
    rec.add_argument("--user", action="append", metavar="ID", help="a user id (repeat); default: every user")
    rec.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    rec.add_argument("--data", metavar="FOLDER", help="interaction folder; default: the bundled MovieLens sample")
    rec.add_argument("--cold-start", metavar="CSV", help="rank only these new items (columns item,text)")
    rec.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. model_name=x")
    add_engine_arguments(rec, "users")
    rec.set_defaults(func=cmd_recommend)
    add_score_parser(commands)
    routing = commands.add_parser("route", help="answer customer messages with an intent's reply, or hand them off")
    routing.add_argument("source", metavar="FILE", help="a CSV/TSV/JSONL/Parquet file with a text column")
    routing.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. alias=challenger")
    routing.set_defaults(func=cmd_route)
    services = "the Prefect server, MLflow server and one worker per work pool (127.0.0.1)"
    up_command = commands.add_parser("up", help=f"start {services}; register the deployments")
    up_command.add_argument(
        "--auth",
        action="store_true",
        help="basic auth on both servers (or FINETUNE_FLOWS_SERVICES_AUTH=true); credentials from "
        "PREFECT_API_AUTH_STRING (user:password), MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
    )
    up_command.set_defaults(func=cmd_up)
    commands.add_parser("down", help=f"stop {services} that `up` started").set_defaults(func=cmd_down)
    commands.add_parser("status", help="what `up` started: pids, URLs, health").set_defaults(func=cmd_status)
    gc = commands.add_parser("gc", help="report (with --yes: free) run folders no model version refers to")
    gc.add_argument("--yes", action="store_true", help="delete them (default: only report)")
    gc.add_argument(
        "--min-age-hours",
        type=float,
        default=6.0,
        help="keep a folder with anything written in the last N hours (it may be a run in progress); default 6",
    )
    gc.set_defaults(func=cmd_gc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from finetune_flows.plugins import FinetuneFlowsError
    from finetune_flows.tasks.core.secrets import install_log_redaction, redact

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()  # no URI credentials in any log line (finetune_flows.tasks.core.secrets)
    for noisy in ("httpx", "httpcore", "urllib3", "alembic", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except FinetuneFlowsError as exc:
        sys.stderr.write(redact(f"finetune-flows: error: {exc}\n"))
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
