"""Experiments: config validation, deterministic assignment, variants served over gRPC,
attribution to Prometheus counters and the offline report."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_cli import ROOT

from conftest import ServerThread, TrainedStore, make_settings
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc
from server.domain import experiments
from server.domain.experiments import ExperimentConfigError, Rate, two_proportion_p

CONFIG = """
[[experiment]]
name = "boost"
salt = "s1"
traffic = 100
[[experiment.variant]]
name = "control"
weight = 1
[[experiment.variant]]
name = "boosted"
weight = 3
session_boost = 8.0
"""


def test_assignment_is_deterministic_and_follows_weights() -> None:
    exps = experiments.parse(__import__("tomllib").loads(CONFIG))
    names = [experiments.assign(exps, "", f"s{i}") for i in range(4000)]
    assert names == [experiments.assign(exps, "", f"s{i}") for i in range(4000)]
    shares = Counter(a.variant.name for a in names if a)
    assert 0.70 < shares["boosted"] / 4000 < 0.80
    assert experiments.assign(exps, "", "") is None
    half = experiments.parse(
        {"experiment": [{"name": "e", "traffic": 50, "variant": [{"name": "a"}, {"name": "b"}]}]}
    )
    inside = sum(experiments.assign(half, f"u{i}", "") is not None for i in range(4000))
    assert 0.45 < inside / 4000 < 0.55


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"experiment": [{"name": "Bad Name", "variant": []}]}, "experiment[0]: name"),
        ({"experiment": [{"name": "e", "variant": [{"name": "a"}]}]}, "at least two"),
        (
            {"experiment": [{"name": "e", "variant": [{"name": "a", "nope": 1}, {"name": "b"}]}]},
            "unknown parameter 'nope'",
        ),
        (
            {
                "experiment": [
                    {"name": "e", "variant": [{"name": "a", "session_boost": -1}, {"name": "b"}]}
                ]
            },
            "session_boost",
        ),
        (
            {
                "experiment": [
                    {"name": "e", "traffic": 101, "variant": [{"name": "a"}, {"name": "b"}]}
                ]
            },
            "traffic",
        ),
    ],
)
def test_bad_config_names_the_entry(raw: dict[str, object], message: str) -> None:
    with pytest.raises(
        ExperimentConfigError, match=message.replace("[", r"\[").replace("]", r"\]")
    ):
        experiments.parse(raw)


def test_intervals_and_tests() -> None:
    lo, hi = Rate(50, 100).interval
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert two_proportion_p(Rate(50, 100), Rate(50, 100)) == pytest.approx(1.0)
    assert two_proportion_p(Rate(100, 1000), Rate(150, 1000)) < 0.01


@pytest.fixture(scope="module")
def exp_server(
    trained: TrainedStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("exp")
    (tmp / "experiments.toml").write_text(CONFIG)
    settings = make_settings(
        trained.artifacts, experiments=str(tmp / "experiments.toml"), event_log=str(tmp / "events")
    )
    thread = ServerThread(settings)
    from server.app import load_experiments

    thread.call(load_experiments(thread.running))
    yield thread
    thread.close()


def test_variants_are_served_and_attributed(
    exp_server: ServerThread, trained: TrainedStore
) -> None:
    item = str(trained.dataset.item_ids[0])
    seen: Counter[str] = Counter()
    with grpc.insecure_channel(exp_server.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        for i in range(40):
            ctx = pb.RequestContext(session_id=f"exp-{i}")
            reply = stub.Recommend(pb.RecommendRequest(context=ctx, num_results=3))
            assert reply.experiment == "boost" and reply.variant in {"control", "boosted"}
            assert experiments.attribution(reply.recommendation_id) == ("boost", reply.variant)
            again = stub.Recommend(pb.RecommendRequest(context=ctx, num_results=3))
            assert again.variant == reply.variant
            seen[reply.variant] += 1
            events = [
                pb.Event(
                    type=pb.Event.RECOMMENDATION_IMPRESSION,
                    recommendation_id=reply.recommendation_id,
                    context=ctx,
                )
            ]
            if reply.variant == "boosted" or i % 4 == 0:
                events.append(
                    pb.Event(
                        type=pb.Event.RECOMMENDATION_CLICK,
                        item_id=item,
                        recommendation_id=reply.recommendation_id,
                        context=ctx,
                    )
                )
            assert stub.TrackEvents(pb.TrackEventsRequest(events=events)).accepted == len(events)
    assert set(seen) == {"control", "boosted"}
    counter = exp_server.running.metrics.experiment_events
    for variant, n in seen.items():
        assert counter.labels("boost", variant, "impression")._value.get() == n
    assert counter.labels("boost", "boosted", "click")._value.get() == seen["boosted"]
    report = subprocess.run(
        [sys.executable, "-m", "endcap.cli", "experiments", "report", "--events", exp_server.settings.event_log,
         "--json", str(Path(exp_server.settings.event_log) / "report.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    rows = {
        r["variant"]: r
        for r in __import__("json").loads(
            (Path(exp_server.settings.event_log) / "report.json").read_text()
        )
    }
    assert rows["boosted"]["ctr"] == 1.0 and rows["boosted"]["impressions"] == seen["boosted"]
    assert rows["control"]["impressions"] == seen["control"]
    assert "boosted" in report.stdout
