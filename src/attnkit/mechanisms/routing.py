"""Routing attention — Efficient Content-Based Sparse Attention with Routing Transformers (Roy, Saffar, Vaswani,
Grangier, 2020, arXiv:2003.05997).

Each head keeps ``num_clusters`` unit-norm centroids ``mu_c``. Queries and keys are routed to their nearest
centroid, and a query attends, with plain softmax, to the keys routed to its own cluster:

    c(x) = argmax_c  x/|x| . mu_c          (nearest centroid on the unit sphere)
    out_i = sum_{j : c(k_j) = c(q_i)} exp(s_ij) v_j / sum_{j : c(k_j) = c(q_i)} exp(s_ij)   (and the pattern's rule)

Training updates the centroids by an exponential moving average (online k-means, the paper's section 4.1):
``mu_c <- normalise(decay * mu_c + (1 - decay) * mean of the unit q and k routed to c)``.

Choices where the paper is vague or does not fit attnkit:
- Per-token assignment, not the paper's balanced top-w routing: assigning each cluster the w tokens closest to
  it makes a token's cluster depend on every other token (in causal mode on future ones, and on the call's
  length); nearest-centroid assignment looks only at the token itself, so causal outputs never see the future
  and chunked decoding equals one call. Clusters may then be unbalanced; the ``bucketed`` path is exact for any
  cluster sizes (a cluster holding every token is plain softmax).
- The EMA never runs inside forward: forward (in training mode, with gradients on) only adds the unit q and k
  of each cluster into accumulators; ``after_step()`` (called by the training loop after each optimizer step)
  applies the update and empties them. So a forward pass never changes the centroids: the reference and the
  fast path agree, chunks agree, and evaluation is deterministic. The update uses the mean (not the paper's
  sum) of the routed vectors, so its size does not depend on the batch; only new keys are counted (a KV
  cache's keys were counted when they came) and padded keys never.
- Centroids are per query head (a key is routed with the centroids of each query head that reads it, so GQA
  equals repeating k, v); they start as random unit vectors drawn from ``seed``; ``redraw()`` starts them
  afresh from a new seed (forgetting what they learned).
- Cross attention routes the context's keys with the same centroids. In causal_cross each query's output
  depends only on itself and the context, so no information flows between queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Paper, Shape, register_mechanism
from ..ops.bucketed import DEFAULT_BLOCK
from ..ops.gqa import repeat_kv
from ..ops.reference import compute_dtype
from ..options import MAX_SEED, check_float, check_int
from ..patterns import ALL_PATTERNS, Pattern
from ..state import KVCache
from ._grouped import GroupedAttention
from ._seeded import SeededDraws


@dataclass(frozen=True)
class RoutingOptions:
    num_clusters: int = 64  # k-means centroids per head; a query sees the keys of its own cluster
    decay: float = 0.999  # EMA factor of the centroid update (after_step), in [0, 1)
    seed: int | None = None  # the initial centroids are drawn from this seed; None: a seed drawn at create
    block_size: int = DEFAULT_BLOCK  # slots per block of the bucketed path (speed only)

    def __post_init__(self):
        check_int("routing", "num_clusters", self.num_clusters)
        check_float("routing", "decay", self.decay, within=(0.0, 0.999999))
        if self.seed is not None:
            check_int("routing", "seed", self.seed, minimum=0, maximum=MAX_SEED)
        check_int("routing", "block_size", self.block_size, maximum=4096)


@register_mechanism("routing")
class Routing(SeededDraws, GroupedAttention):
    family = "routed sparse"
    paper = Paper("Efficient Content-Based Sparse Attention with Routing Transformers", 2020, "2003.05997")
    patterns = ALL_PATTERNS
    exact = False
    trainable = True  # learned state sized by the heads (centroids, updated by EMA rather than gradients)
    state_kind = KVCache
    complexity = Complexity(time="O(T·C·D + T·(T / C)·D) (C clusters; O(T^1.5·D) at C = sqrt(T))", memory="O(T)")
    Options = RoutingOptions
    example_options = ({"num_clusters": 4, "seed": 1}, {"num_clusters": 16, "block_size": 4})
    fidelity_knob = ("num_clusters", (64, 16, 4))

    def __init__(self, heads: int | None = None, head_dim: int | None = None, **options):
        super().__init__(heads, head_dim, **options)
        c = self.options.num_clusters
        self.register_buffer("centroids", self._initial_centroids())  # [H, C, D], unit rows
        # statistics of the current step, applied by after_step() (not saved: a step is not a model's state)
        self.register_buffer("routed_sum", torch.zeros(heads, c, head_dim), persistent=False)  # [H, C, D]
        self.register_buffer("routed_count", torch.zeros(heads, c), persistent=False)  # [H, C]

    def _initial_centroids(self) -> torch.Tensor:
        g = self.generator()
        mu = torch.randn(self.heads, self.options.num_clusters, self.head_dim, generator=g, dtype=torch.float64)
        return F.normalize(mu, dim=-1).float()

    def redraw(self, seed: int | None = None) -> None:
        """Start the centroids afresh from ``seed`` (or a seed drawn from torch's generator)."""
        super().redraw(seed)
        self.centroids.copy_(self._initial_centroids())
        self.routed_sum.zero_()
        self.routed_count.zero_()

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        if x.q.shape[-1] != self.head_dim:
            raise ShapeError(f"routing was created for head_dim {self.head_dim}; got q with {x.q.shape[-1]}")

    # ---- routing (shared by every path) ---------------------------------------------------------------

    def group_ids(self, x: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centroid of every query and key: ``[B, Hq, 1, Tq]``, ``[B, Hq, 1, Tk]`` (keys per query head).

        In training with gradients on, also adds the new unit q and k to the step's statistics."""
        cdt = compute_dtype(x.q.dtype)
        learning = self.training and torch.is_grad_enabled()
        with torch.no_grad():
            mu = self.centroids.to(cdt)  # [H, C, D]
            q = F.normalize(x.q.to(cdt), dim=-1)  # [B, Tq, H, D]
            k = F.normalize(repeat_kv(x.k, x.groups).to(cdt), dim=-1)  # [B, Tk, H, D]
            q_ids = torch.einsum("bthd,hcd->bthc", q, mu).argmax(-1)  # [B, Tq, H]
            k_ids = torch.einsum("bthd,hcd->bthc", k, mu).argmax(-1)  # [B, Tk, H]
            if learning:
                self._accumulate(x, q, k, q_ids, k_ids)
        return q_ids.transpose(1, 2)[:, :, None], k_ids.transpose(1, 2)[:, :, None]

    def _accumulate(self, x: AttentionInputs, q, k, q_ids, k_ids) -> None:
        """Add the unit queries and the call's new, real keys to the sums of their clusters."""
        new = slice(x.q_offset, None)  # keys of a KV cache were counted in the call that brought them
        k, k_ids = k[:, new], k_ids[:, new]
        real = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
        if x.key_padding_mask is not None:
            real = x.key_padding_mask[:, new]
        c, h = self.options.num_clusters, x.heads
        slot = torch.arange(h, device=k.device) * c  # [H]: first cluster of each head
        for vecs, ids, keep in ((q, q_ids, None), (k, k_ids, real)):
            flat = (ids + slot).reshape(-1)  # [B*T*H] cluster of each vector, numbered per head
            vecs = vecs.reshape(-1, vecs.shape[-1]).to(self.routed_sum.dtype)  # [B*T*H, D]
            if keep is not None:  # padded keys add nothing
                weight = keep[..., None].expand_as(ids).reshape(-1)
                flat, vecs = flat[weight], vecs[weight]
            self.routed_sum.view(h * c, -1).index_add_(0, flat, vecs)
            self.routed_count.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=self.routed_count.dtype))

    @torch.no_grad()
    def after_step(self) -> None:
        """Online k-means: move each centroid that received vectors this step towards their mean, renormalise."""
        seen = self.routed_count > 0  # [H, C]
        mean = self.routed_sum / self.routed_count.clamp_min(1)[..., None]
        d = self.options.decay
        moved = F.normalize(d * self.centroids + (1 - d) * mean, dim=-1)
        self.centroids.copy_(torch.where(seen[..., None], moved, self.centroids))
        self.routed_sum.zero_()
        self.routed_count.zero_()

    def n_groups(self) -> int:
        return self.options.num_clusters

    # ---- costs ---------------------------------------------------------------------------------------

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        c = self.options.num_clusters
        routing = 2.0 * shape.heads * (shape.tq + shape.tk) * c * shape.dk
        # expected keys per query with equal clusters
        keys = shape.tk / c * (0.5 if pattern is Pattern.CAUSAL_SELF else 1.0)
        attend = 2.0 * shape.heads * shape.tq * keys * (shape.dk + shape.dv)
        return shape.batch * (routing + attend)
