"""SASRec-style sequential recommender: trained in torch, user side encoded in numpy."""

# The architecture and its numpy forward pass (what the server runs) live in
# server/domain/sequence.py; this module trains the weights in torch and scores
# with that numpy code. Importing it does not import torch, only the training
# functions do, when called.

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

# Re-exported (`x as x`): the numpy side's names are this module's public API too.
from server.domain.sequence import FINAL_LN_BIAS as FINAL_LN_BIAS
from server.domain.sequence import FINAL_LN_WEIGHT as FINAL_LN_WEIGHT
from server.domain.sequence import ITEM_EMBEDDINGS as ITEM_EMBEDDINGS
from server.domain.sequence import LN_EPS as LN_EPS
from server.domain.sequence import NUM_HEADS as NUM_HEADS
from server.domain.sequence import POSITION as POSITION
from server.domain.sequence import Encoder, encoder_shapes
from server.domain.sequence import encode_sequence as encode_sequence
from server.domain.sequence import encode_sequences as encode_sequences
from server.domain.sequence import layer_key as layer_key
from server.domain.sequence import num_layers as num_layers
from training.protocol import Part, ScoreFn, Split, evaluate

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SeqConfig:
    """Architecture and training hyper-parameters (defaults tuned on ML-100K valid)."""

    dim: int = 64
    layers: int = 2
    heads: int = 2
    inner: int = 256
    max_len: int = 50
    dropout: float = 0.3  # embeddings, residual branches and attention weights
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 32  # windows of max_len positions
    max_epochs: int = 25  # the valid curve still rises slowly; this caps CPU time
    patience: int = 10  # epochs without a better valid NDCG@10
    mask_seen: bool = True  # drop the user's earlier items from each softmax
    init_std: float = 0.02
    threads: int = 1  # 2 is barely faster on 2 cores and far slower when shared

    def shapes(self, n_items: int) -> dict[str, tuple[int, ...]]:
        """Every exported weight name and its shape."""
        return {ITEM_EMBEDDINGS: (n_items, self.dim)} | encoder_shapes(
            self.dim, self.layers, self.inner, self.max_len
        )


def init_weights(n_items: int, config: SeqConfig, seed: int) -> dict[str, npt.NDArray[Any]]:
    """Random initial weights: normal(0, init_std) matrices, LN at identity, zero biases."""
    if config.dim % config.heads:
        raise ValueError(f"dim must be divisible by heads, got {config.dim} and {config.heads}")
    rng = np.random.default_rng(seed)
    out: dict[str, npt.NDArray[Any]] = {}
    for name, shape in config.shapes(n_items).items():
        if name == NUM_HEADS:
            out[name] = np.array(config.heads, dtype=np.int64)
        elif name.endswith("ln1.weight") or name.endswith("ln2.weight") or name == FINAL_LN_WEIGHT:
            out[name] = np.ones(shape, dtype=np.float32)
        elif name.endswith("bias"):
            out[name] = np.zeros(shape, dtype=np.float32)
        else:
            out[name] = rng.normal(0.0, config.init_std, shape).astype(np.float32)
    return out


def encode_history(
    weights: Mapping[str, npt.NDArray[Any]], history: Part, batch_size: int = 256
) -> npt.NDArray[np.float32]:
    """The user vector of every user of `history`, float32 (u, d)."""
    rows = [history.row(u) for u in range(history.n_users)]
    encoder = Encoder.of(weights)
    parts = [
        encode_sequences(weights, rows[lo : lo + batch_size], encoder)
        for lo in range(0, len(rows), batch_size)
    ]
    dim = int(weights[POSITION].shape[1])
    return np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)


@dataclass(frozen=True, slots=True)
class SequentialModel:
    """Exported weights (see SeqConfig.shapes) and how they were trained."""

    weights: dict[str, npt.NDArray[Any]]
    config: SeqConfig
    best_epoch: int
    valid_ndcg10: float
    train_s: float
    train_cpu_s: float = 0.0  # process CPU seconds: stable under a busy machine
    curve: tuple[tuple[int, float, float], ...] = field(default=())  # (epoch, loss, valid)

    def scorer(self, history: Part) -> ScoreFn:
        """Scores from the numpy encoder, as the server computes them."""
        users = encode_history(self.weights, history)
        table = np.asarray(self.weights[ITEM_EMBEDDINGS], dtype=np.float32)

        def score(batch: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
            result: npt.NDArray[np.float32] = users[batch] @ table.T
            return result

        return score


# ---- torch (training) ---------------------------------------------------------


def torch_forward(
    params: Mapping[str, torch.Tensor],
    seq: torch.Tensor,
    *,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Hidden states (b, L', d) for `seq` (b, L') of item index + 1, 0 = padding.

    Sequences are left-padded so the last column is the most recent item and
    takes position row L-1. Padding keys are masked; each position may also
    attend to itself, so padding rows stay finite and never reach real rows.
    """
    import torch
    import torch.nn.functional as F

    b, cols = seq.shape
    table = params[ITEM_EMBEDDINGS]
    position = params[POSITION]
    length, dim = position.shape
    heads = int(params[NUM_HEADS])
    head_dim = dim // heads
    padded_table = torch.cat([torch.zeros_like(table[:1]), table])
    x = padded_table[seq] + position[length - cols :][None]
    x = F.dropout(x, dropout, training)
    causal = torch.tril(torch.ones(cols, cols, dtype=torch.bool))
    mask = (causal[None] & (seq > 0)[:, None, :]) | torch.eye(cols, dtype=torch.bool)[None]
    for i in range(num_layers(params)):

        def p(name: str, layer: int = i) -> torch.Tensor:
            return params[layer_key(layer, name)]

        h = F.layer_norm(x, (dim,), p("ln1.weight"), p("ln1.bias"), LN_EPS)
        q, k, v = F.linear(h, p("qkv.weight"), p("qkv.bias")).chunk(3, dim=-1)
        q, k, v = (t.view(b, cols, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        att = att.masked_fill(~mask[:, None], float("-inf")).softmax(dim=-1)
        att = F.dropout(att, dropout, training)
        ctx = (att @ v).transpose(1, 2).reshape(b, cols, dim)
        x = x + F.dropout(F.linear(ctx, p("out.weight"), p("out.bias")), dropout, training)
        h = F.layer_norm(x, (dim,), p("ln2.weight"), p("ln2.bias"), LN_EPS)
        h = F.linear(
            F.gelu(F.linear(h, p("fc1.weight"), p("fc1.bias")), approximate="tanh"),
            p("fc2.weight"),
            p("fc2.bias"),
        )
        x = x + F.dropout(h, dropout, training)
    return F.layer_norm(x, (dim,), params[FINAL_LN_WEIGHT], params[FINAL_LN_BIAS], LN_EPS)


def _table_scorer(scores: npt.NDArray[np.float32]) -> ScoreFn:
    def score(users: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        return scores[users]

    return score


def left_padded(history: Part, users: npt.NDArray[np.int64], length: int) -> npt.NDArray[np.int64]:
    """int64 (b, length): each user's last `length` items + 1, left-padded with 0."""
    out = np.zeros((users.shape[0], length), dtype=np.int64)
    for j, u in enumerate(users.tolist()):
        row = history.row(u)[-length:]
        if row.shape[0]:
            out[j, length - row.shape[0] :] = row.astype(np.int64) + 1
    return out


def _windows(
    lengths: npt.NDArray[np.int64], length: int, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """(user, end) pairs, int64 (w, 2): windows whose targets [end - length, end)
    cover every train position >= 1. One window always ends at the user's last
    item; the others' boundaries shift randomly between epochs, so the most
    recent positions may be covered twice.
    """
    out: list[tuple[int, int]] = []
    for u, n in enumerate(lengths.tolist()):
        if n < 2:
            continue
        offset = int(rng.integers(0, length)) if n > length else 0
        out.append((u, n))
        out.extend((u, end) for end in range(n - offset if offset else n - length, 1, -length))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def _batch(
    train: Part, windows: npt.NDArray[np.int64], length: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """For (user, end) windows: inputs (b, L) item + 1, left-padded with 0;
    target positions in the user's train sequence (b, L), -1 under padding;
    target items (b, L), -1 under padding.
    """
    b = windows.shape[0]
    inputs = np.zeros((b, length), dtype=np.int64)
    target_pos = np.full((b, length), -1, dtype=np.int64)
    targets = np.full((b, length), -1, dtype=np.int64)
    for j, (u, end) in enumerate(windows.tolist()):
        seq = train.row(u).astype(np.int64)
        lo = max(0, end - length - 1)
        k = end - 1 - lo
        inputs[j, length - k :] = seq[lo : end - 1] + 1
        target_pos[j, length - k :] = np.arange(lo + 1, end)
        targets[j, length - k :] = seq[lo + 1 : end]
    return inputs, target_pos, targets


def train_sequential(
    split: Split,
    config: SeqConfig = SeqConfig(),
    seed: int = 0,
    progress: Callable[[int, float, float], None] | None = None,
) -> SequentialModel:
    """Train on split.train, early-stop on valid NDCG@10, return the best weights.

    Every train position predicts the next train item with a softmax over all
    items (minus the user's earlier items if mask_seen); each epoch covers
    every position once in windows of max_len. Valid users are encoded from
    their train items. `progress(epoch, train_loss, valid_ndcg10)` is called
    after every epoch.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(config.threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    start, start_cpu = time.perf_counter(), time.process_time()
    n_items, length = split.n_items, config.max_len
    params: dict[str, torch.Tensor] = {}
    for name, value in init_weights(n_items, config, seed).items():
        tensor = torch.from_numpy(value)
        params[name] = tensor if name == NUM_HEADS else torch.nn.Parameter(tensor)
    trainable = [p for name, p in params.items() if name != NUM_HEADS]
    optimizer = torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    train = split.train
    lengths = train.lengths()
    # first_seen[u, i]: position of item i in u's train sequence (int32 max if absent).
    first_seen = np.full((split.n_users, n_items), np.iinfo(np.int32).max, dtype=np.int32)
    first_seen[train.users(), train.items] = (
        np.arange(len(train)) - np.repeat(train.indptr[:-1], lengths)
    ).astype(np.int32)
    first_seen_t = torch.from_numpy(first_seen)
    valid_inputs = torch.from_numpy(
        left_padded(split.history("valid"), np.arange(split.n_users, dtype=np.int64), length)
    )
    best, best_epoch, stale = -1.0, -1, 0
    best_weights: dict[str, npt.NDArray[Any]] = {}
    curve: list[tuple[int, float, float]] = []
    for epoch in range(config.max_epochs):
        windows = _windows(lengths, length, rng)
        windows = windows[rng.permutation(windows.shape[0])]
        total, seen_rows = 0.0, 0
        for lo in range(0, windows.shape[0], config.batch_size):
            chunk = windows[lo : lo + config.batch_size]
            inputs, target_pos, targets = (
                torch.from_numpy(a) for a in _batch(train, chunk, length)
            )
            hidden = torch_forward(params, inputs, dropout=config.dropout, training=True)
            real = target_pos >= 0
            logits = hidden[real] @ params[ITEM_EMBEDDINGS].T
            if config.mask_seen:
                user_seen = first_seen_t[torch.from_numpy(chunk[:, 0])]
                earlier = user_seen[:, None, :] < target_pos[:, :, None]
                logits = logits.masked_fill(earlier[real], float("-inf"))
            loss = F.cross_entropy(logits, targets[real])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += float(loss.detach()) * chunk.shape[0]
            seen_rows += chunk.shape[0]
        with torch.no_grad():
            users = torch_forward(params, valid_inputs)[:, -1]
            scores = (users @ params[ITEM_EMBEDDINGS].T).numpy()
        ndcg = evaluate(_table_scorer(scores), split, "valid")["ndcg@10"]
        loss_value = total / max(seen_rows, 1)
        curve.append((epoch, loss_value, ndcg))
        if progress is not None:
            progress(epoch, loss_value, ndcg)
        if ndcg > best:
            best, best_epoch, stale = ndcg, epoch, 0
            best_weights = {k: v.detach().numpy().copy() for k, v in params.items()}
        else:
            stale += 1
            if stale >= config.patience:
                break
    logger.info(
        "sequential model: best epoch %d of %d, valid ndcg@10 %.4f, %.0f s",
        best_epoch,
        len(curve),
        best,
        time.perf_counter() - start,
    )
    return SequentialModel(
        weights=best_weights,
        config=config,
        best_epoch=best_epoch,
        valid_ndcg10=best,
        train_s=time.perf_counter() - start,
        train_cpu_s=time.process_time() - start_cpu,
        curve=tuple(curve),
    )
