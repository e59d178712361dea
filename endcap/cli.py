"""The `endcap` command: demo, train, serve, health."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from server.infra.logging import configure as configure_logging
from server.infra.settings import Settings, SettingsError


def _serve_settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        os.environ,
        args.config,
        artifacts=args.artifacts,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        log_level=args.log_level,
    )


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        metavar="TOML",
        help='settings file (field names as keys, e.g. state_backend = "redis"); '
        "ENDCAP_* variables and flags override it [ENDCAP_CONFIG]",
    )
    p.add_argument(
        "--artifacts", type=Path, help="artifact directory (or root with LATEST) [ENDCAP_ARTIFACTS]"
    )
    p.add_argument("--host", help="address to bind (default 127.0.0.1) [ENDCAP_HOST]")
    p.add_argument("--port", type=int, help="gRPC port (default 50051) [ENDCAP_PORT]")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus port, 0 = off (default 9100) [ENDCAP_METRICS_PORT]",
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR [ENDCAP_LOG_LEVEL]")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=int, default=50_000, help="synthetic catalog size")
    p.add_argument("--users", type=int, default=20_000, help="synthetic shoppers")
    p.add_argument("--interactions", type=int, default=1_000_000, help="synthetic interactions")
    p.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default: TrainConfig)"
    )
    p.add_argument("--dim", type=int, default=64, help="embedding dimension")
    p.add_argument("--seed", type=int, default=0, help="random seed for data and training")


def _train(args: argparse.Namespace, out: Path) -> Path:
    from training.pipeline import train_and_export
    from training.synthetic import StoreConfig
    from training.train import TrainConfig

    store = StoreConfig(
        n_items=args.items, n_users=args.users, n_events=args.interactions, seed=args.seed
    )
    overrides = {"dim": args.dim, "seed": args.seed}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    return train_and_export(
        out,
        store,
        TrainConfig(**overrides),
        events=getattr(args, "event_log", None),
        report=True,
    )


def cmd_train(args: argparse.Namespace) -> int:
    path = _train(args, args.out)
    print(f"artifact written to {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import serve

    try:
        settings = _serve_settings(args)
    except SettingsError as exc:
        print(f"endcap serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    return asyncio.run(serve(settings))


def cmd_demo(args: argparse.Namespace) -> int:
    from endcap.demo import run_demo
    from server.artifact import ArtifactError, resolve

    root: Path = args.artifacts or Path("artifacts")
    try:
        existing = None if args.retrain else resolve(root)
    except ArtifactError:
        existing = None
    if existing is None:
        print(
            f"Training on the synthetic store ({args.items:,} items, {args.interactions:,} interactions)…"
        )
        _train(args, root)
    else:
        print(f"Reusing the trained artifact {existing} (pass --retrain to train again)")
    args.artifacts = root
    try:
        settings = _serve_settings(args)
    except SettingsError as exc:
        print(f"endcap demo: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    return asyncio.run(run_demo(settings, keep_serving=not args.no_wait))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import run_command

    return run_command(args)


def _add_evaluate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        choices=("synthetic", "ml100k"),
        help="built-in data: the synthetic store or MovieLens-100K (default: synthetic, or "
        "--interactions FILE)",
    )
    p.add_argument(
        "--interactions",
        help="a shop's interactions CSV/Parquet (user_id,item_id,timestamp[,event_type]"
        "[,rating][,device][,country]); with --dataset synthetic, the number of events",
    )
    p.add_argument(
        "--items",
        help="the shop's items CSV/Parquet (item_id,category,brand,price,currency,countries,"
        "in_stock); with --dataset synthetic, the catalog size",
    )
    p.add_argument("--users", type=int, default=20_000, help="synthetic shoppers")
    p.add_argument("--seed", type=int, default=0, help="random seed for data and training")
    p.add_argument("--epochs", type=int, help="two-tower epochs (default: TrainConfig)")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    p.add_argument("--plot", type=Path, help="also draw test NDCG@10/Recall@10 per model (PNG)")
    p.add_argument(
        "--baselines",
        default="MostPop,SegmentPop,ALS,EASE",
        help="comma-separated among MostPop, SegmentPop, ALS, EASE (EASE only up to 5,000 items)",
    )
    p.add_argument("--no-context-ablation", action="store_true", help="skip the no-context model")
    p.add_argument("--no-cold-start", action="store_true", help="skip held-out items and shoppers")
    p.add_argument("--no-fidelity", action="store_true", help="skip the artifact + FAISS check")
    p.add_argument(
        "--no-placements",
        action="store_true",
        help="skip replaying held-out shopping through the served Engine per placement",
    )
    p.add_argument("--artifacts", type=Path, help="keep the exported artifact under this root")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="leave malformed rows out (counted by reason) instead of stopping at the first",
    )
    p.add_argument("--min-rating", type=float, help="leave out interactions rated below this")
    p.add_argument("--base-currency", help="currency item prices are converted to")
    p.add_argument(
        "--currency-rates", help="units per 1 base currency unit, e.g. EUR=1,USD=1.08,GBP=0.85"
    )
    p.add_argument(
        "--seeds", default="0,1,2", help="ML-100K: comma-separated seeds (mean and std over them)"
    )
    p.add_argument(
        "--models",
        help="ML-100K: comma-separated models (default: all of training.protocol's)",
    )


def cmd_experiments_report(args: argparse.Namespace) -> int:
    import json

    from endcap.reports import experiment_results, results_table
    from endcap.ui import console

    results, _ = experiment_results(args.events)
    table, rows = results_table(results)
    console().print(table if rows else "no attributed impressions, clicks or purchases in the log")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from endcap.reports import log_stats_table
    from endcap.ui import console
    from server.state.eventlog import EventLog, read_events

    if args.action == "compact":
        log = EventLog(args.dir, fsync="always")
        removed = log.compact()
        log.close()
        print(f"removed {removed} forgotten events from closed segments")
    _, stats = read_events(args.dir)
    console().print(log_stats_table(stats, args.dir))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 if the server at --target reports SERVING (container health checks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if args.tls_ca or args.tls_cert:
        if bool(args.tls_cert) != bool(args.tls_key):
            print("endcap health: --tls-cert and --tls-key go together", file=sys.stderr)
            return 2
        try:
            pems = [
                Path(p).read_bytes() if p else None
                for p in (args.tls_ca, args.tls_key, args.tls_cert)
            ]
        except OSError as exc:
            print(f"endcap health: {exc}", file=sys.stderr)
            return 2
        creds = grpc.ssl_channel_credentials(*pems)
        options = (
            [("grpc.ssl_target_name_override", args.tls_server_name)]
            if args.tls_server_name
            else []
        )
        channel = grpc.secure_channel(args.target, creds, options=options)
    else:
        channel = grpc.insecure_channel(args.target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"{args.target}: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.run import main as run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="endcap", description="Recommendation microservice for online stores."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="train on the synthetic store, serve, and show recommendations",
        description="Train on the built-in synthetic store (unless an artifact exists), start the "
        "server, print recommendations for contrasting shoppers, then keep serving until Ctrl-C.",
    )
    _add_serve_flags(demo)
    _add_train_flags(demo)
    demo.add_argument("--retrain", action="store_true", help="train even if an artifact exists")
    demo.add_argument("--no-wait", action="store_true", help="exit after the sample calls")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser(
        "train",
        help="train on the synthetic store and write an artifact",
        description="Generate the synthetic store, train the two-tower model, build the FAISS "
        "index and write a new artifact version under --out (LATEST points at it).",
    )
    train.add_argument("--out", type=Path, default=Path("artifacts"), help="artifact root")
    train.add_argument(
        "--events",
        dest="event_log",
        type=Path,
        help="also learn from this durable event log directory (the server's ENDCAP_EVENT_LOG)",
    )
    _add_train_flags(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser(
        "evaluate",
        help="measure recommendation quality against baselines (shared/eval/PROTOCOL.md)",
        description="Split the data per shopper in time (80/10/10), train endcap's two-tower model "
        "and baselines on the train part, and report test metrics, the lift from context, cold "
        "start, quality per segment and serving fidelity (artifact + FAISS). With --dataset "
        "ml100k, run the PROTOCOL.md comparison over seeds.",
    )
    _add_evaluate_flags(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    serve = sub.add_parser(
        "serve",
        help="serve an artifact over gRPC",
        description="Serve Recommend, Rerank and SimilarItems over gRPC, with health, "
        "reflection and Prometheus metrics. Settings: defaults < --config file < ENDCAP_* "
        "environment variables < flags.",
    )
    _add_serve_flags(serve)
    serve.set_defaults(func=cmd_serve)

    experiments = sub.add_parser(
        "experiments",
        help="A/B experiment reports",
        description="Report experiment results from the durable event log: impressions, clicks "
        "and purchases attributed to each variant through recommendation_id, with 95% intervals.",
    )
    exp_sub = experiments.add_subparsers(dest="action", required=True)
    report = exp_sub.add_parser("report", help="per-variant CTR and conversion with intervals")
    report.add_argument("--events", type=Path, required=True, help="event log directory")
    report.add_argument("--json", type=Path, help="also write the rows as JSON here")
    report.set_defaults(func=cmd_experiments_report)

    events = sub.add_parser(
        "events",
        help="inspect or compact the durable event log",
        description="stats: counts of events, tombstones and torn bytes. compact: rewrite closed "
        "segments without forgotten shoppers' events (ForgetUser tombstones them first).",
    )
    events.add_argument("action", choices=("stats", "compact"))
    events.add_argument("--dir", type=Path, required=True, help="event log directory")
    events.set_defaults(func=cmd_events)

    health = sub.add_parser(
        "health",
        help="check a server's gRPC health",
        description="Call grpc.health.v1.Health/Check; exit 0 only if SERVING.",
    )
    health.add_argument("--target", default="127.0.0.1:50051", help="host:port")
    health.add_argument("--service", default="endcap.v1.Recommender", help="service name")
    health.add_argument("--timeout", type=float, default=2.0, help="seconds")
    health.add_argument(
        "--tls-ca", metavar="PEM", help="CA bundle to verify a TLS server (ENDCAP_TLS_CERT is on)"
    )
    health.add_argument("--tls-cert", metavar="PEM", help="client certificate, for mutual TLS")
    health.add_argument("--tls-key", metavar="PEM", help="key of --tls-cert")
    health.add_argument(
        "--tls-server-name", metavar="NAME", help="name to verify in the server certificate"
    )
    health.set_defaults(func=cmd_health)

    from benchmarks.options import add_arguments as add_bench_flags

    bench = sub.add_parser(
        "bench",
        help="load-test a served synthetic catalog against transport and index floors",
        description="Build (or reuse, cached in ~/.cache/endcap/bench) a synthetic catalog, serve "
        "it on loopback, run open- and closed-loop load, and report latency, throughput, recall "
        "and memory next to an echo gRPC server and raw FAISS measured in the same run "
        "(benchmarks/README.md).",
    )
    add_bench_flags(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
