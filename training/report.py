"""The training report written next to an artifact: Markdown with PNG plots (matplotlib Agg)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from training.data import DEVICE_NAMES, Dataset
from training.evaluate import Tower, csr_rows, top_k
from training.train import METRIC_NAMES, TrainedModel, _split, collapse_events, score_rows

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"
LOSS_PNG, VALIDATION_PNG, SEGMENTS_PNG = "loss.png", "validation.png", "segments.png"
_K = 50


def validation_by_segment(dataset: Dataset, model: TrainedModel) -> dict[str, dict[str, Any]]:
    """Validation metrics of the trained model per device and per country.

    The holdout is the trainer's own (each shopper's latest new item, the
    same sampled shoppers), scored with the server's query formula from the
    exported arrays. Returns {"device": {name: {...}}, "country": {code: {...}}},
    each with users, recall@10, recall@50 and ndcg@10.
    """
    config = model.config
    inter = collapse_events(dataset, config.event_weights)
    # The trainer's own leave-last-out split: scoring any other held-out item would
    # score items the model was trained on.
    # train() draws the validation sample first from a generator seeded with config.seed.
    rng = np.random.default_rng(config.seed)
    split = _split(inter, config.min_user_items, config.max_eval_users, rng)
    picked = np.arange(split.val_user.size, dtype=np.int64)
    rows = split.val_pos[picked]
    users = inter.user[rows]
    targets = inter.item[rows]
    length = config.history_length
    idx = rows[:, None] - length + np.arange(length)[None, :]
    mask = idx >= inter.indptr[users][:, None]
    counts = mask.sum(axis=1)
    h_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    h_items = inter.item[idx[mask]]
    n_countries = len(dataset.country_codes)
    device = inter.device[rows] if config.context else np.zeros_like(rows)
    country = inter.country[rows] if config.context else np.full_like(rows, n_countries)
    tower = Tower.of_model(model)
    seen_ptr, seen = csr_rows(split.seen_indptr, split.seen_items, picked)
    rank_of = np.full(rows.size, _K, dtype=np.int64)
    batch = score_rows(dataset.n_items, most=512)
    for lo in range(0, rows.size, batch):
        sl = np.arange(lo, min(lo + batch, rows.size))
        hp, hi = csr_rows(h_ptr, h_items, sl)
        q = tower.queries(users[sl], hp, hi, device[sl], country[sl])
        sp, si = csr_rows(seen_ptr, seen, sl)
        top = top_k(q @ tower.item_embeddings.T, sp, si, _K)
        hit = top == targets[sl][:, None]
        rank_of[sl] = np.where(hit.any(axis=1), hit.argmax(axis=1), _K)
    per_user = {
        "recall@10": (rank_of < 10).astype(np.float64),
        "recall@50": (rank_of < 50).astype(np.float64),
        "ndcg@10": np.where(rank_of < 10, 1.0 / np.log2(rank_of + 2.0), 0.0),
    }
    return {
        "all": _group(per_user, np.zeros(rows.size, dtype=np.int64), ("all",)),
        "device": _group(per_user, inter.device[rows], DEVICE_NAMES),
        "country": _group(per_user, inter.country[rows], (*dataset.country_codes, "unknown")),
    }


def _group(
    per_user: Mapping[str, npt.NDArray[np.float64]],
    labels: npt.NDArray[np.int64],
    names: Sequence[str],
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for code, name in enumerate(names):
        take = labels == code
        if take.any():
            out[name] = {"users": int(take.sum())} | {
                metric: float(values[take].mean()) for metric, values in per_user.items()
            }
    return out


def write_report(
    dataset: Dataset,
    model: TrainedModel,
    out_dir: Path,
    *,
    artifact: Path | None = None,
    extra: Mapping[str, object] | None = None,
) -> Path:
    """Write report.md and its plots into `out_dir`; returns the Markdown file's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    segments = validation_by_segment(dataset, model)
    _plot_loss(model, out_dir / LOSS_PNG)
    _plot_validation(model, out_dir / VALIDATION_PNG)
    _plot_segments(segments, out_dir / SEGMENTS_PNG)
    path = out_dir / REPORT_FILE
    path.write_text(_markdown(dataset, model, segments, artifact, extra or {}))
    logger.info("wrote the training report %s", path)
    return path


def _markdown(
    dataset: Dataset,
    model: TrainedModel,
    segments: Mapping[str, Mapping[str, Mapping[str, float]]],
    artifact: Path | None,
    extra: Mapping[str, object],
) -> str:
    lines = [
        f"# Training report: {dataset.name}",
        "",
        f"- data: {dataset.n_items:,} items, {dataset.n_users:,} shoppers, "
        f"{dataset.n_events:,} events (fingerprint `{dataset.fingerprint()}`)",
        f"- examples: {model.n_train_examples:,} training interactions; validation: each of "
        f"{model.n_validation_users:,} shoppers' latest new item, ranked among all items "
        "(their earlier items excluded)",
        f"- kept epoch {model.best_epoch} of {len(model.history)} (best validation NDCG@10), "
        f"{model.seconds:.1f} s",
    ]
    if artifact is not None:
        lines.append(f"- artifact: `{artifact}`")
    for key, value in extra.items():
        lines.append(f"- {key}: {value}")
    header = "| | loss | " + " | ".join(METRIC_NAMES) + " | seconds |"
    lines += ["", "## Validation per epoch", "", header, "|---" * (len(METRIC_NAMES) + 3) + "|"]
    lines.append(
        "| popularity | | "
        + " | ".join(f"{model.baseline_metrics[m]:.4f}" for m in METRIC_NAMES)
        + " | |"
    )
    for stats in model.history:
        kept = " (kept)" if stats.epoch == model.best_epoch else ""
        lines.append(
            f"| epoch {stats.epoch}{kept} | {stats.loss:.4f} | "
            + " | ".join(f"{stats.metrics[m]:.4f}" for m in METRIC_NAMES)
            + f" | {stats.seconds:.1f} |"
        )
    lines.append(
        f"| epoch {model.best_epoch}, no user vector (new shoppers) | | "
        + " | ".join(f"{model.history_only_metrics[m]:.4f}" for m in METRIC_NAMES)
        + " | |"
    )
    lines += ["", f"![loss]({LOSS_PNG}) ![validation]({VALIDATION_PNG})", ""]
    lines += ["## Validation by segment", ""]
    for group in ("device", "country"):
        rows = segments.get(group, {})
        if len(rows) < 2:
            continue
        lines += [f"| {group} | shoppers | " + " | ".join(METRIC_NAMES) + " |"]
        lines.append("|---" * (len(METRIC_NAMES) + 2) + "|")
        for name, m in rows.items():
            lines.append(
                f"| {name} | {int(m['users']):,} | "
                + " | ".join(f"{m[k]:.4f}" for k in METRIC_NAMES)
                + " |"
            )
        lines.append("")
    lines += [f"![segments]({SEGMENTS_PNG})", "", "## Hyper-parameters", ""]
    lines += ["| parameter | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in model.config.to_dict().items()]
    return "\n".join(lines) + "\n"


def _figure(width: float, height: float) -> Any:
    # The object API renders with Agg and touches no pyplot state or display.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=80, layout="constrained")


def _plot_loss(model: TrainedModel, path: Path) -> None:
    fig = _figure(5, 3)
    ax = fig.subplots()
    for stats in model.history:
        curve = np.asarray(stats.batch_losses)
        if curve.size:
            x = stats.epoch - 1 + (np.arange(curve.size) + 1) / curve.size
            ax.plot(x, curve, color="tab:blue", linewidth=1)
    epochs = [s.epoch for s in model.history]
    ax.plot(epochs, [s.loss for s in model.history], "o", color="tab:orange", label="epoch mean")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.savefig(path)


def _plot_validation(model: TrainedModel, path: Path) -> None:
    fig = _figure(5, 3)
    ax = fig.subplots()
    epochs = [s.epoch for s in model.history]
    for i, name in enumerate(METRIC_NAMES):
        color = f"C{i}"
        ax.plot(epochs, [s.metrics[name] for s in model.history], "o-", color=color, label=name)
        ax.axhline(model.baseline_metrics[name], color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("epoch (dotted: popularity)")
    ax.set_ylabel("validation")
    ax.set_xticks(epochs)
    top = max(max(s.metrics.values()) for s in model.history)
    ax.set_ylim(0, 1.35 * top if top > 0 else 1.0)  # headroom: the legend sits above the lines
    ax.legend(fontsize="small", loc="upper center", ncols=len(METRIC_NAMES))
    fig.savefig(path)


def _plot_segments(segments: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path) -> None:
    groups = [g for g in ("device", "country") if len(segments.get(g, {})) > 1] or ["all"]
    widths = [max(2.0, 0.45 * len(segments[g])) for g in groups]
    fig = _figure(min(12.0, 1.0 + sum(widths)), 3)
    axes = fig.subplots(1, len(groups), width_ratios=widths, squeeze=False)[0]
    overall = segments["all"]["all"]["ndcg@10"]
    for ax, group in zip(axes, groups, strict=True):
        names = list(segments[group])
        values = [segments[group][n]["ndcg@10"] for n in names]
        ax.bar(names, values, color="tab:blue")
        ax.axhline(overall, color="black", linestyle=":", linewidth=1)
        ax.set_title(f"validation NDCG@10 by {group}", fontsize="medium")
        ax.tick_params(axis="x", labelrotation=60, labelsize="small")
    fig.savefig(path)


def plot_evaluation(report: Mapping[str, Any], path: Path) -> Path:
    """A bar chart of test NDCG@10 and Recall@10 per model from an `endcap evaluate` report."""
    models = [m for m in report["models"] if m.get("test")]
    names = [str(m["name"]).replace(" (artifact + FAISS)", "\n(artifact+FAISS)") for m in models]
    fig = _figure(max(5.0, 1.1 * len(models)), 3.2)
    ax = fig.subplots()
    x = np.arange(len(models))
    for offset, metric, color in ((-0.2, "ndcg@10", "tab:blue"), (0.2, "recall@10", "tab:orange")):
        values = [m["test"].get(metric, 0.0) for m in models]
        ax.bar(x + offset, values, width=0.4, label=f"test {metric}", color=color)
    ax.set_xticks(x, names, fontsize="small", rotation=20, ha="right")
    ax.set_title(f"{report['dataset']['name']}: per-user temporal split", fontsize="medium")
    top = max((m["test"].get("recall@10", 0.0) for m in models), default=0.0)
    ax.set_ylim(0, 1.25 * top if top > 0 else 1.0)
    ax.legend(fontsize="small", loc="upper center", ncols=2)
    fig.savefig(path)
    return path
