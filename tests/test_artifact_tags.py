"""Merchandising tags in the artifact: written by training, checked when loaded."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import TrainedStore
from server.artifact import ArtifactError, Manifest, load_artifact, validate_arrays


def test_training_writes_the_stores_tags(trained: TrainedStore) -> None:
    art = load_artifact(trained.artifacts)
    ds = trained.dataset
    assert art.manifest.tag_names == ds.tag_names == ("high_margin", "clearance")
    np.testing.assert_array_equal(art["item_tags"], ds.item_tags)
    share = [float(np.mean(art["item_tags"] >> np.uint64(j) & np.uint64(1))) for j in (0, 1)]
    assert 0.2 < share[0] < 0.3 and 0.01 < share[1] < 0.1


def test_tag_bits_must_have_names(trained: TrainedStore) -> None:
    art = load_artifact(trained.artifacts)
    fewer = dataclasses.replace(art.manifest, tag_names=("high_margin",))
    with pytest.raises(ArtifactError, match="item_tags: bits beyond the 1 tag_names"):
        validate_arrays(fewer, art.arrays)
    raw = art.manifest.to_json() | {"tag_names": ["a", "a"]}
    with pytest.raises(ArtifactError, match="tag_names must be at most 64 distinct names"):
        Manifest.from_json(raw)
    untagged = {k: v for k, v in art.manifest.to_json().items() if k != "tag_names"}
    assert Manifest.from_json(untagged).tag_names == ()
