"""The sequential (SASRec-style) query encoder's numpy forward pass, shared by serving and training."""

# The user vector is a causal transformer's output at the most recent of the
# user's last L items; a score is its dot product with a row of item_embeddings
# (the same table embeds the input items), so FAISS inner-product search serves
# it. Per layer i the block is pre-LN:
#   x += out(attention(ln1(x)));  x += fc2(gelu_tanh(fc1(ln2(x))))
# training/sequential.py trains these weights in torch and scores with this code.

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

LN_EPS = 1e-5
ITEM_EMBEDDINGS = "item_embeddings"  # (n, d) input and output item table
POSITION = "seq_position"  # (L, d); row L-1 is the most recent item
NUM_HEADS = "seq_num_heads"  # int64 ()
FINAL_LN_WEIGHT, FINAL_LN_BIAS = "seq_final_ln.weight", "seq_final_ln.bias"  # (d,)
LAYER_SHAPES: dict[str, tuple[str, ...]] = {
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


def num_layers(weights: Mapping[str, object]) -> int:
    """How many blocks the weights hold."""
    count = 0
    while layer_key(count, "qkv.weight") in weights:
        count += 1
    return count


def encoder_shapes(dim: int, layers: int, inner: int, max_len: int) -> dict[str, tuple[int, ...]]:
    """Every encoder weight name (the item table excluded) and its shape."""
    dims = {"d": dim, "3d": 3 * dim, "f": inner}
    out: dict[str, tuple[int, ...]] = {
        POSITION: (max_len, dim),
        NUM_HEADS: (),
        FINAL_LN_WEIGHT: (dim,),
        FINAL_LN_BIAS: (dim,),
    }
    for i in range(layers):
        for name, shape in LAYER_SHAPES.items():
            out[layer_key(i, name)] = tuple(dims[s] for s in shape)
    return out


@dataclass(frozen=True, slots=True)
class _Layer:
    ln1: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]
    qkv: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]  # weight (d, 3d), bias
    out: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]  # (d, d), (d,)
    ln2: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]
    fc1: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]  # (d, f), (f,)
    fc2: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]  # (f, d), (d,)


@dataclass(frozen=True, slots=True)
class Encoder:
    """Encoder weights laid out for the forward pass (linear weights transposed
    and contiguous once, at load, not per call).

    position float32 (L, d), final_ln two float32 (d,), heads divides d.
    """

    position: npt.NDArray[np.float32]
    heads: int
    layers: tuple[_Layer, ...]
    final_ln: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]
    causal_bias: npt.NDArray[np.float32]  # (L, L): 0 on and below the diagonal, else -inf

    @classmethod
    def of(cls, weights: Mapping[str, npt.NDArray[Any]]) -> Encoder:
        """From weights named as encoder_shapes says (extra names are ignored)."""

        def f32(name: str, transpose: bool = False) -> npt.NDArray[np.float32]:
            value = np.asarray(weights[name], dtype=np.float32)
            return np.ascontiguousarray(value.T if transpose else value)

        def pair(i: int, name: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
            linear = not name.startswith("ln")
            return f32(layer_key(i, f"{name}.weight"), linear), f32(layer_key(i, f"{name}.bias"))

        layers = tuple(
            _Layer(*(pair(i, name) for name in ("ln1", "qkv", "out", "ln2", "fc1", "fc2")))
            for i in range(num_layers(weights))
        )
        heads = int(weights[NUM_HEADS])
        position = f32(POSITION)
        if heads < 1 or position.shape[1] % heads:
            raise ValueError(f"{NUM_HEADS} must divide dim {position.shape[1]}, got {heads}")
        length = position.shape[0]
        causal = np.tril(np.ones((length, length), dtype=np.bool_))
        bias = np.where(causal, np.float32(0.0), np.float32(-np.inf)).astype(np.float32)
        return cls(position, heads, layers, (f32(FINAL_LN_WEIGHT), f32(FINAL_LN_BIAS)), bias)

    @property
    def max_len(self) -> int:
        return int(self.position.shape[0])

    @property
    def dim(self) -> int:
        return int(self.position.shape[1])

    def encode(self, vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The user vector, float32 (d,), of one sequence of item vectors (m, d),
        oldest first; reads the last max_len. What the server runs per request."""
        x = vectors[-self.max_len :][None]
        real = np.ones(x.shape[:2], dtype=np.bool_)
        if x.shape[1] == 0:  # a lone padding token, as encode_sequences does
            x, real = np.zeros((1, 1, self.dim), dtype=np.float32), np.zeros((1, 1), np.bool_)
        result: npt.NDArray[np.float32] = self.forward(x, real)[0]
        return result

    def forward(
        self, x: npt.NDArray[np.float32], real: npt.NDArray[np.bool_]
    ) -> npt.NDArray[np.float32]:
        """User vectors, float32 (b, d), for embedded sequences x (b, cols, d),
        cols <= max_len, right-aligned (the last column is the most recent item);
        real bool (b, cols) is False under left padding, whose input vectors must
        be zero. Padding keys are masked and every position may attend to itself,
        as in the torch model, so a vector does not depend on the padding.
        """
        b, cols, dim = x.shape
        heads, head_dim = self.heads, dim // self.heads
        scale = 1.0 / math.sqrt(head_dim)
        x = (x + self.position[self.max_len - cols :]).astype(np.float32, copy=False)
        # Added to attention logits: 0 where a key may be read, -inf elsewhere.
        bias = self.causal_bias[None, None, self.max_len - cols :, self.max_len - cols :]
        if not real.all():
            causal = np.tril(np.ones((cols, cols), dtype=np.bool_))
            allowed = (causal[None] & real[:, None, :]) | np.eye(cols, dtype=np.bool_)[None]
            bias = np.where(allowed, np.float32(0.0), np.float32(-np.inf))[:, None]
        for i, w in enumerate(self.layers):
            # The last block only needs the most recent position's output.
            rows = cols if i < len(self.layers) - 1 else 1
            h = _layer_norm(x, *w.ln1)
            qkv = (h.reshape(-1, dim) @ w.qkv[0] + w.qkv[1]).reshape(b, cols, 3, heads, head_dim)
            q = qkv[:, cols - rows :, 0].transpose(0, 2, 1, 3)  # (b, heads, rows, head_dim)
            k = qkv[:, :, 1].transpose(0, 2, 3, 1)  # (b, heads, head_dim, cols)
            v = qkv[:, :, 2].transpose(0, 2, 1, 3)  # (b, heads, cols, head_dim)
            att = q @ k
            att *= np.float32(scale)
            att += bias[..., cols - rows :, :]
            att -= att.max(axis=-1, keepdims=True)
            np.exp(att, out=att)
            att /= att.sum(axis=-1, keepdims=True)
            ctx = (att @ v).transpose(0, 2, 1, 3).reshape(b * rows, dim)
            x = x[:, cols - rows :] + (ctx @ w.out[0] + w.out[1]).reshape(b, rows, dim)
            h2 = _layer_norm(x, *w.ln2).reshape(-1, dim)
            ffn = _gelu_tanh(h2 @ w.fc1[0] + w.fc1[1]) @ w.fc2[0]
            x = x + (ffn + w.fc2[1]).reshape(b, rows, dim)
        out = _layer_norm(x[:, -1], *self.final_ln)
        return out.astype(np.float32, copy=False)


def _layer_norm(
    x: npt.NDArray[np.float32], weight: npt.NDArray[np.float32], bias: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    # ufunc reductions and in-place steps: ndarray.mean's Python overhead dominated here.
    scale = np.float32(1.0 / x.shape[-1])
    mean = np.add.reduce(x, axis=-1, keepdims=True)
    mean *= scale
    centered = x - mean
    var = np.add.reduce(centered * centered, axis=-1, keepdims=True)
    var *= scale
    var += np.float32(LN_EPS)
    np.sqrt(var, out=var)
    centered /= var
    centered *= weight
    centered += bias
    return centered


def _gelu_tanh(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    # In place on one temporary: half the time of the textbook expression.
    z = x * x
    z *= np.float32(0.044715)
    z += np.float32(1.0)
    z *= x
    z *= np.float32(math.sqrt(2.0 / math.pi))
    np.tanh(z, out=z)
    z += np.float32(1.0)
    z *= x
    z *= np.float32(0.5)
    return z


def encode_sequences(
    weights: Mapping[str, npt.NDArray[Any]],
    item_seqs: Sequence[npt.NDArray[np.integer]],
    encoder: Encoder | None = None,
) -> npt.NDArray[np.float32]:
    """User vectors, float32 (b, d), for b sequences of item indexes, oldest first.

    Reads only each sequence's last L = seq_position.shape[0] items, embedded by
    weights[item_embeddings]. Shorter sequences are left-padded to the batch's
    longest, so a vector does not depend on what else is in the batch. An empty
    sequence gets the vector of a lone padding token (zero item embedding) at
    the most recent position. Pass `encoder` (Encoder.of(weights)) to skip
    re-laying out the weights on every call.
    """
    enc = encoder or Encoder.of(weights)
    table = weights[ITEM_EMBEDDINGS]
    seqs = [np.asarray(s, dtype=np.int64)[-enc.max_len :] for s in item_seqs]
    b = len(seqs)
    cols = max([1, *(s.shape[0] for s in seqs)])
    index = np.zeros((b, cols), dtype=np.int64)
    real = np.zeros((b, cols), dtype=np.bool_)
    for j, s in enumerate(seqs):
        if s.shape[0]:
            index[j, cols - s.shape[0] :] = s
            real[j, cols - s.shape[0] :] = True
    x = np.where(real[..., None], table[index], 0.0).astype(np.float32)
    return enc.forward(x, real)


def encode_sequence(
    weights: Mapping[str, npt.NDArray[Any]], item_seq: npt.NDArray[np.integer]
) -> npt.NDArray[np.float32]:
    """The user vector, float32 (d,), for item indexes `item_seq`, oldest first."""
    result: npt.NDArray[np.float32] = encode_sequences(weights, [item_seq])[0]
    return result
