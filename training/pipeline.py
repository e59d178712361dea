"""Generate a synthetic store, train on it, export the artifact: `endcap train` and `demo`."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from training.events import merge_event_log
from training.export import export_artifact
from training.synthetic import StoreConfig, generate_store
from training.train import METRIC_NAMES, TrainConfig, TrainedModel, train

logger = logging.getLogger(__name__)


def train_and_export(
    root: Path,
    store: StoreConfig,
    config: TrainConfig,
    *,
    progress: bool = True,
    events: Path | None = None,
    report: bool = False,
) -> Path:
    """Generate `store`, train with `config`, write an artifact under `root`; returns its directory.

    With `progress`, shows progress bars and prints a summary table of the
    validation metrics per epoch next to the popularity baseline. With
    `report`, also writes <artifact>/report/report.md and its plots
    (training.report).
    """
    began = time.perf_counter()
    dataset = generate_store(store)
    if events is not None:
        dataset, counts = merge_event_log(dataset, events)
        if progress:
            Console().print(
                f"event log {events}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
            )
    generated = time.perf_counter()
    logger.info(
        "generated %s: %d items, %d users, %d events in %.1fs",
        dataset.name,
        dataset.n_items,
        dataset.n_users,
        dataset.n_events,
        generated - began,
    )
    model = train(dataset, config, progress=progress)
    trained = time.perf_counter()
    path = export_artifact(dataset, model, root, extra_params={"store": dataclasses.asdict(store)})
    exported = time.perf_counter()
    report_path = None
    if report:
        from training.report import write_report

        report_path = write_report(dataset, model, path / "report", artifact=path)
    if progress:
        Console().print(
            summary_table(
                model,
                title=f"{dataset.name}: {dataset.n_items:,} items, {dataset.n_events:,} events",
                caption=(
                    f"generate {generated - began:.1f}s, train {trained - generated:.1f}s, "
                    f"export {exported - trained:.1f}s -> {path}"
                ),
            )
        )
        if report_path is not None:
            Console().print(f"training report: {report_path}")
    return path


def summary_table(model: TrainedModel, *, title: str = "", caption: str = "") -> Table:
    """Validation metrics per epoch, the popularity baseline, and the epoch kept."""
    table = Table(title=title or None, caption=caption or None)
    table.add_column("model")
    table.add_column("loss", justify="right")
    for name in METRIC_NAMES:
        table.add_column(name, justify="right")
    table.add_column("seconds", justify="right")
    table.add_row(
        "popularity",
        "",
        *(f"{model.baseline_metrics[name]:.4f}" for name in METRIC_NAMES),
        "",
    )
    for stats in model.history:
        kept = stats.epoch == model.best_epoch
        table.add_row(
            f"epoch {stats.epoch}" + (" (kept)" if kept else ""),
            f"{stats.loss:.4f}",
            *(f"{stats.metrics[name]:.4f}" for name in METRIC_NAMES),
            f"{stats.seconds:.1f}",
            style="bold green" if kept else None,
        )
    table.add_row(
        f"epoch {model.best_epoch}, no user vector",
        "",
        *(f"{model.history_only_metrics[name]:.4f}" for name in METRIC_NAMES),
        "",
    )
    return table
