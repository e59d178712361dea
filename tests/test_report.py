"""The training report: Markdown and PNG plots next to the artifact."""

from __future__ import annotations

from pathlib import Path

import pytest

from endcap.cli import main
from server.artifact import resolve
from training.report import validation_by_segment, write_report
from training.synthetic import StoreConfig, generate_store
from training.train import TrainConfig, train

PNG = b"\x89PNG\r\n\x1a\n"


def test_segment_metrics_add_up_to_the_trainers_validation() -> None:
    ds = generate_store(StoreConfig(n_items=1_500, n_users=400, n_events=15_000, seed=4))
    model = train(ds, TrainConfig(dim=16, epochs=2, seed=4), progress=False)
    segments = validation_by_segment(ds, model)
    overall = segments["all"]["all"]
    assert overall["users"] == model.n_validation_users
    # The trainer ranks with torch, the report with the server's numpy formula.
    for metric in ("recall@10", "recall@50", "ndcg@10"):
        assert overall[metric] == pytest.approx(model.metrics[metric], abs=0.01)
    assert set(segments["device"]) == {"mobile", "tablet", "desktop"}
    assert sum(int(s["users"]) for s in segments["country"].values()) == overall["users"]


def test_endcap_train_writes_the_report_next_to_the_artifact(tmp_path: Path) -> None:
    flags = ["--items", "1500", "--users", "400", "--interactions", "15000", "--epochs", "2"]
    assert main(["train", "--out", str(tmp_path), *flags, "--dim", "16"]) == 0
    report = resolve(tmp_path) / "report"
    text = (report / "report.md").read_text()
    assert "## Validation per epoch" in text and "| popularity |" in text
    assert "| device | shoppers |" in text and "| DE |" in text
    for name in ("loss.png", "validation.png", "segments.png"):
        assert f"]({name})" in text
        assert (report / name).read_bytes().startswith(PNG)


def test_write_report_into_any_directory(tmp_path: Path) -> None:
    ds = generate_store(StoreConfig(n_items=600, n_users=150, n_events=5_000, seed=1))
    model = train(ds, TrainConfig(dim=8, epochs=1, seed=1), progress=False)
    path = write_report(ds, model, tmp_path / "r", extra={"note": "tiny"})
    assert path.name == "report.md" and "- note: tiny" in path.read_text()
