"""SASRec-style sequential recommender: trained in torch, user side encoded in numpy."""

# The user vector is a causal transformer's output at the most recent of the
# user's last max_len items; a score is its dot product with a row of
# item_embeddings (the same table embeds the input items), so FAISS
# inner-product search serves it. encode_sequence(s) is the numpy forward pass
# the server runs: importing this module does not import torch, only the
# training functions do, when called.

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from training.protocol import Part, ScoreFn, Split, evaluate

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

LN_EPS = 1e-5
# Weight names. Per layer i the block is pre-LN:
#   x += out(attention(ln1(x)));  x += fc2(gelu_tanh(fc1(ln2(x))))
ITEM_EMBEDDINGS = "item_embeddings"  # (n, d) input and output item table
POSITION = "seq_position"  # (L, d); row L-1 is the most recent item
NUM_HEADS = "seq_num_heads"  # int64 ()
FINAL_LN_WEIGHT, FINAL_LN_BIAS = "seq_final_ln.weight", "seq_final_ln.bias"  # (d,)
_LAYER_SHAPES: dict[str, tuple[str, ...]] = {
    "ln1.weight": ("d",),
    "ln1.bias": ("d",),
    "qkv.weight": ("3d", "d"),  # rows: query, key, value projections
    "qkv.bias": ("3d",),
    "out.weight": ("d", "d"),
    "out.bias": ("d",),
    "ln2.weight": ("d",),
    "ln2.bias": ("d",),
    "fc1.weight": ("f", "d"),
    "fc1.bias": ("f",),
    "fc2.weight": ("d", "f"),
    "fc2.bias": ("d",),
}


def layer_key(layer: int, name: str) -> str:
    """The weight name of one block parameter, e.g. seq_layer0.qkv.weight."""
    return f"seq_layer{layer}.{name}"


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
        dims = {"d": self.dim, "3d": 3 * self.dim, "f": self.inner}
        out: dict[str, tuple[int, ...]] = {
            ITEM_EMBEDDINGS: (n_items, self.dim),
            POSITION: (self.max_len, self.dim),
            NUM_HEADS: (),
            FINAL_LN_WEIGHT: (self.dim,),
            FINAL_LN_BIAS: (self.dim,),
        }
        for i in range(self.layers):
            for name, shape in _LAYER_SHAPES.items():
                out[layer_key(i, name)] = tuple(dims[s] for s in shape)
        return out


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


# ---- numpy forward (serving) -------------------------------------------------


def _layer_norm(
    x: npt.NDArray[np.float32], weight: npt.NDArray[np.float32], bias: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    result: npt.NDArray[np.float32] = (x - mean) / np.sqrt(var + LN_EPS) * weight + bias
    return result


def _gelu_tanh(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
    return np.asarray(0.5 * x * (1.0 + np.tanh(inner)), dtype=np.float32)


def num_layers(weights: Mapping[str, object]) -> int:
    """How many blocks the weights hold."""
    count = 0
    while layer_key(count, "qkv.weight") in weights:
        count += 1
    return count


def encode_sequences(
    weights: Mapping[str, npt.NDArray[Any]], item_seqs: Sequence[npt.NDArray[np.integer]]
) -> npt.NDArray[np.float32]:
    """User vectors, float32 (b, d), for b sequences of item indexes, oldest first.

    Reads only each sequence's last L = seq_position.shape[0] items. Shorter
    sequences are left-padded to the batch's longest; padding keys are masked
    and every position may attend to itself, as in the torch model, so a
    vector does not depend on what else is in the batch. An empty sequence
    gets the vector of a lone padding token (zero item embedding) at the most
    recent position.
    """
    table = weights[ITEM_EMBEDDINGS]
    position = weights[POSITION]
    length, dim = position.shape
    heads = int(weights[NUM_HEADS])
    head_dim = dim // heads
    seqs = [np.asarray(s, dtype=np.int64)[-length:] for s in item_seqs]
    b = len(seqs)
    cols = max([1, *(s.shape[0] for s in seqs)])
    index = np.zeros((b, cols), dtype=np.int64)
    real = np.zeros((b, cols), dtype=np.bool_)
    for j, s in enumerate(seqs):
        if s.shape[0]:
            index[j, cols - s.shape[0] :] = s
            real[j, cols - s.shape[0] :] = True
    x = np.where(real[..., None], table[index], 0.0).astype(np.float32) + position[length - cols :]
    causal = np.tril(np.ones((cols, cols), dtype=np.bool_))
    allowed = (causal[None] & real[:, None, :]) | np.eye(cols, dtype=np.bool_)[None]
    n_layers = num_layers(weights)
    for i in range(n_layers):
        w = {name: weights[layer_key(i, name)] for name in _LAYER_SHAPES}
        # The last block only needs the most recent position's output.
        rows = cols if i < n_layers - 1 else 1
        h = _layer_norm(x, w["ln1.weight"], w["ln1.bias"])
        qkv = (h.reshape(-1, dim) @ w["qkv.weight"].T + w["qkv.bias"]).reshape(
            b, cols, 3, heads, head_dim
        )
        q = qkv[:, cols - rows :, 0].transpose(0, 2, 1, 3)  # (b, heads, rows, head_dim)
        k = qkv[:, :, 1].transpose(0, 2, 3, 1)  # (b, heads, head_dim, cols)
        v = qkv[:, :, 2].transpose(0, 2, 1, 3)  # (b, heads, cols, head_dim)
        att = (q @ k) / math.sqrt(head_dim)
        att = np.where(allowed[:, None, cols - rows :], att, -np.inf)
        att = np.exp(att - att.max(axis=-1, keepdims=True))
        att /= att.sum(axis=-1, keepdims=True)
        ctx = (att @ v).transpose(0, 2, 1, 3).reshape(b * rows, dim)
        x = x[:, cols - rows :] + (ctx @ w["out.weight"].T + w["out.bias"]).reshape(b, rows, dim)
        h = _layer_norm(x, w["ln2.weight"], w["ln2.bias"]).reshape(-1, dim)
        ffn = _gelu_tanh(h @ w["fc1.weight"].T + w["fc1.bias"]) @ w["fc2.weight"].T
        x = x + (ffn + w["fc2.bias"]).reshape(b, rows, dim)
    out = _layer_norm(x[:, -1], weights[FINAL_LN_WEIGHT], weights[FINAL_LN_BIAS])
    return out.astype(np.float32)


def encode_sequence(
    weights: Mapping[str, npt.NDArray[Any]], item_seq: npt.NDArray[np.integer]
) -> npt.NDArray[np.float32]:
    """The user vector, float32 (d,), for item indexes `item_seq`, oldest first.

    What the server computes per request; see encode_sequences.
    """
    result: npt.NDArray[np.float32] = encode_sequences(weights, [item_seq])[0]
    return result


def encode_history(
    weights: Mapping[str, npt.NDArray[Any]], history: Part, batch_size: int = 256
) -> npt.NDArray[np.float32]:
    """The user vector of every user of `history`, float32 (u, d)."""
    rows = [history.row(u) for u in range(history.n_users)]
    parts = [
        encode_sequences(weights, rows[lo : lo + batch_size])
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
