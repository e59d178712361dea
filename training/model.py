"""The two-tower retrieval model whose query formula server/artifact.py's SCHEMA fixes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True, slots=True)
class Batch:
    """One training batch of B examples, H history slots and M shared random negatives.

    users int64 (B,), keep_user bool (B,); history int64 (B, H), history_mask
    bool (B, H); device, country int64 (B,) (0 and c when dropped); targets
    int64 (B,), keep_target_id bool (B,), target_log_q float (B,); negatives
    int64 (M,), keep_negative_id bool (M,); weights float (B,).
    """

    users: Tensor
    keep_user: Tensor
    history: Tensor
    history_mask: Tensor
    device: Tensor
    country: Tensor
    targets: Tensor
    keep_target_id: Tensor
    target_log_q: Tensor
    negatives: Tensor
    keep_negative_id: Tensor
    weights: Tensor


class TwoTower(nn.Module):
    """Query tower and item tower scoring by dot product, exactly as the server does.

    item(i)  = item_id[i] + category[c(i)] + brand[b(i)] + price[p(i)]
    query    = user[u] + history(mean(item(h) for h in recent)) + device[d] + country[c]
    score    = query . item(i)

    `category` rows are category vectors summed over the category and its
    ancestors, so a leaf shares what it learns with its siblings. The id part
    is what training adds on top of the content part; an item with no id
    vector (new, or dropped out in training) is scored from content alone.
    """

    def __init__(
        self,
        *,
        item_category: Tensor,
        item_brand: Tensor,
        item_price_bucket: Tensor,
        category_ancestry: Tensor,
        n_users: int,
        n_brands: int,
        n_price_buckets: int,
        n_countries: int,
        dim: int,
    ) -> None:
        """item_* are int64 (n,); category_ancestry is float32 (k, k), row i has 1 at i and its ancestors.

        n_countries excludes the final "unknown country" row, which is added here.
        """
        super().__init__()
        n_items = int(item_category.shape[0])
        n_categories = int(category_ancestry.shape[0])
        self.register_buffer("item_category", item_category.long(), persistent=False)
        self.register_buffer("item_brand", item_brand.long(), persistent=False)
        self.register_buffer("item_price_bucket", item_price_bucket.long(), persistent=False)
        self.register_buffer("category_ancestry", category_ancestry.float(), persistent=False)
        # Id vectors start at zero: an item never trained on is exactly its content vector.
        # Sparse gradients: a batch touches a few thousand of these rows, and a
        # dense Adam step over every row costs more than the rest of the step.
        self.item_id = nn.Embedding(n_items, dim, sparse=True)
        self.user = nn.Embedding(n_users, dim, sparse=True)
        nn.init.zeros_(self.item_id.weight)
        nn.init.zeros_(self.user.weight)
        self.category = nn.Embedding(n_categories, dim)
        self.brand = nn.Embedding(n_brands, dim)
        self.price = nn.Embedding(n_price_buckets, dim)
        self.device = nn.Embedding(4, dim)
        self.country = nn.Embedding(n_countries + 1, dim)
        for table in (self.category, self.brand, self.price, self.device, self.country):
            nn.init.normal_(table.weight, std=0.1)
        # Identity start: a shopper's query begins as the mean of what they looked at.
        self.history = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.history.weight)

    def category_table(self) -> Tensor:
        """float (k, d): each category's vector summed with its ancestors'."""
        table: Tensor = self.get_buffer("category_ancestry") @ self.category.weight
        return table

    def content(self, items: Tensor) -> Tensor:
        """float (..., d): the item tower (category + brand + price bucket) of item indexes."""
        vectors: Tensor = (
            F.embedding(self.get_buffer("item_category")[items], self.category_table())
            + self.brand(self.get_buffer("item_brand")[items])
            + self.price(self.get_buffer("item_price_bucket")[items])
        )
        return vectors

    def items(self, items: Tensor) -> Tensor:
        """float (..., d): item vectors, id + content."""
        vectors: Tensor = self.item_id(items) + self.content(items)
        return vectors

    def all_items(self) -> Tensor:
        """float (n, d): every item's vector."""
        every = torch.arange(self.item_id.num_embeddings, device=self.item_id.weight.device)
        return self.item_id.weight + self.content(every)

    def query(
        self,
        users: Tensor,
        keep_user: Tensor,
        history: Tensor,
        history_mask: Tensor,
        device: Tensor,
        country: Tensor,
    ) -> Tensor:
        """float (B, d): query vectors.

        users int64 (B,), keep_user bool (B,): False reads as an anonymous shopper.
        history int64 (B, H) item indexes, history_mask bool (B, H): True where real.
        device int64 (B,) in 0..3, country int64 (B,) in 0..c (c = unknown).
        """
        return self._query(users, keep_user, self.items(history), history_mask, device, country)

    def _query(
        self,
        users: Tensor,
        keep_user: Tensor,
        history_vectors: Tensor,
        history_mask: Tensor,
        device: Tensor,
        country: Tensor,
    ) -> Tensor:
        mask = history_mask.to(history_vectors.dtype).unsqueeze(-1)
        summed = (history_vectors * mask).sum(dim=1)
        # No history contributes zero, as on the server.
        mean = summed / mask.sum(dim=1).clamp(min=1.0)
        user = self.user(users) * keep_user.unsqueeze(-1).to(mean.dtype)
        query: Tensor = user + self.history(mean) + self.device(device) + self.country(country)
        return query

    def loss(self, batch: Batch, *, negative_log_q: float, logq_weight: float) -> Tensor:
        """Weighted sampled-softmax loss of one training batch (see sampled_softmax_loss)."""
        size, length = batch.history.shape
        # Each item the batch touches is embedded once: histories repeat popular
        # items, and the id table's sparse gradient then has one row per item.
        touched = torch.cat([batch.history.reshape(-1), batch.targets, batch.negatives])
        unique, inverse = torch.unique(touched, return_inverse=True)
        ids = self.item_id(unique)
        content = self.content(unique)
        at_history = inverse[: size * length].view(size, length)
        at_target = inverse[size * length : size * length + size]
        at_negative = inverse[size * length + size :]
        query = self._query(
            batch.users,
            batch.keep_user,
            F.embedding(at_history, ids + content),
            batch.history_mask,
            batch.device,
            batch.country,
        )

        def vectors(at: Tensor, keep_id: Tensor) -> Tensor:
            keep = keep_id.unsqueeze(-1).to(ids.dtype)
            return F.embedding(at, content) + F.embedding(at, ids) * keep

        return sampled_softmax_loss(
            query,
            batch.targets,
            vectors(at_target, batch.keep_target_id),
            batch.target_log_q,
            batch.negatives,
            vectors(at_negative, batch.keep_negative_id),
            negative_log_q,
            batch.weights,
            logq_weight,
        )


def sampled_softmax_loss(
    query: Tensor,
    targets: Tensor,
    target_vectors: Tensor,
    target_log_q: Tensor,
    negatives: Tensor,
    negative_vectors: Tensor,
    negative_log_q: float,
    weights: Tensor,
    logq_weight: float = 1.0,
) -> Tensor:
    """Weighted softmax over in-batch targets plus shared random negatives, logQ-corrected.

    query (B, d); targets int64 (B,); target_vectors (B, d); target_log_q (B,)
    = log of each target's expected count in a batch; negatives int64 (M,),
    negative_vectors (M, d), negative_log_q = log(M / n) for uniform draws;
    weights (B,). Another row's target equal to this row's own is not a
    negative for it, nor is a random negative equal to it. Subtracting log Q
    keeps in-batch sampling from pushing popular items down just for being
    sampled often (Yi et al., RecSys 2019).
    """
    candidates = torch.cat([targets, negatives])
    log_q = torch.cat(
        [target_log_q, torch.full_like(negatives, 0, dtype=query.dtype) + negative_log_q]
    )
    with torch.no_grad():
        # One bias matrix, added inside the matmul: the correction, and -inf
        # where a candidate is the row's own target seen again.
        accidental = targets.unsqueeze(1) == candidates.unsqueeze(0)
        accidental.diagonal().fill_(False)
        bias = torch.where(accidental, float("-inf"), -logq_weight * log_q.unsqueeze(0))
    logits = torch.addmm(bias, query, torch.cat([target_vectors, negative_vectors]).T)
    labels = torch.arange(query.shape[0], device=query.device)
    losses = F.cross_entropy(logits, labels, reduction="none")
    return (losses * weights).sum() / weights.sum()


class Adam:
    """Adam (decoupled weight decay) that updates only touched rows of sparse gradients.

    Embedding tables with sparse gradients get lazy Adam: only the rows a batch
    touched move, and untouched rows keep their moments. torch.optim.SparseAdam
    does the same but builds several sparse tensors per step (a fifth of a step
    on a 2-vCPU box), and constructing any torch.optim optimizer imports
    torch._dynamo (~2 s, most of a small test run). Dense gradients get plain
    AdamW. Bias correction uses the global step count.
    """

    def __init__(
        self,
        params: list[Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1.0 - beta1**self.steps)
        bias2 = math.sqrt(1.0 - beta2**self.steps)
        decay = self.lr * self.weight_decay
        for p, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            grad = p.grad
            if grad is None:
                continue
            if not grad.is_sparse:
                if decay:
                    p.mul_(1.0 - decay)
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().div_(bias2).add_(self.eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)
                continue
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
            m = exp_avg.index_select(0, rows).lerp_(values, 1.0 - beta1)
            v = exp_avg_sq.index_select(0, rows).mul_(beta2)
            v.addcmul_(values, values, value=1.0 - beta2)
            exp_avg.index_copy_(0, rows, m)
            exp_avg_sq.index_copy_(0, rows, v)
            update = m.div_(v.sqrt_().div_(bias2).add_(self.eps)).mul_(step_size)
            if decay:
                # Decay only the rows in play, like their moments (lazy).
                update.add_(p.index_select(0, rows), alpha=decay)
            p.index_add_(0, rows, update, alpha=-1.0)
