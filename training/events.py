"""Fold the server's durable event log into a Dataset for the next retrain."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from endcap.v1 import recommender_pb2 as pb
from server.state.eventlog import read_events
from training.data import ADD_TO_CART, PURCHASE, VIEW, Dataset

logger = logging.getLogger(__name__)

# Logged event types the model learns from, mapped to Dataset event types.
_TYPES = {pb.Event.VIEW: VIEW, pb.Event.ADD_TO_CART: ADD_TO_CART, pb.Event.PURCHASE: PURCHASE}


def merge_event_log(dataset: Dataset, directory: Path) -> tuple[Dataset, Counter[str]]:
    """`dataset` plus every live event in the log (forgotten shoppers' events are
    already excluded by the reader). Returns the merged dataset and counts of what
    was used and what was skipped, and why; nothing is dropped silently."""
    records, stats = read_events(directory)
    counts: Counter[str] = Counter(
        read=stats.events, forgotten=stats.dead_events, torn_bytes=stats.torn_bytes
    )
    item_row = {str(item): i for i, item in enumerate(dataset.item_ids)}
    user_row = {str(user): i for i, user in enumerate(dataset.user_ids)}
    country_row = {c: i for i, c in enumerate(dataset.country_codes)}
    new_users: list[str] = []
    new_country: list[int] = []
    new_device: list[int] = []
    rows: list[tuple[int, int, int, int, int, int]] = []
    for record in records:
        ev = record.event
        kind = _TYPES.get(ev.type)
        if kind is None:
            counts["skipped_type"] += 1
            continue
        item = item_row.get(ev.item_id)
        if item is None:
            counts["skipped_unknown_item"] += 1
            continue
        ctx = ev.context
        shopper = ctx.user_id or f"session:{ctx.session_id}"
        country = country_row.get(ctx.country, 0)
        device = ctx.device or 1
        user = user_row.get(shopper)
        if user is None:
            user = dataset.n_users + len(new_users)
            user_row[shopper] = user
            new_users.append(shopper)
            new_country.append(country)
            new_device.append(device)
        ts = ev.timestamp.seconds if ev.HasField("timestamp") else record.received_unix_ms // 1000
        rows.append((user, item, ts, kind, device, country))
        counts["used"] += 1
    counts["new_shoppers"] = len(new_users)
    if not rows:
        return dataset, counts
    arr = np.asarray(rows, dtype=np.int64)
    ev_ts = np.concatenate([dataset.ev_ts, arr[:, 2]])
    order = np.argsort(ev_ts, kind="stable")
    merged = dataclasses.replace(
        dataset,
        name=f"{dataset.name}+events",
        user_ids=np.concatenate([dataset.user_ids, np.asarray(new_users, dtype=np.str_)]),
        user_country=np.concatenate([dataset.user_country, np.asarray(new_country, np.int16)]),
        user_device=np.concatenate([dataset.user_device, np.asarray(new_device, np.int8)]),
        ev_user=np.concatenate([dataset.ev_user, arr[:, 0].astype(np.int32)])[order],
        ev_item=np.concatenate([dataset.ev_item, arr[:, 1].astype(np.int32)])[order],
        ev_ts=ev_ts[order],
        ev_type=np.concatenate([dataset.ev_type, arr[:, 3].astype(np.int8)])[order],
        ev_device=np.concatenate([dataset.ev_device, arr[:, 4].astype(np.int8)])[order],
        ev_country=np.concatenate([dataset.ev_country, arr[:, 5].astype(np.int16)])[order],
    )
    logger.info("event log %s: %s", directory, dict(counts))
    return merged, counts
