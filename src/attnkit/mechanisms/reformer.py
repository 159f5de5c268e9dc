"""Reformer LSH attention — Reformer: The Efficient Transformer (Kitaev, Kaiser, Levskaya, 2020,
arXiv:2001.04451).

Each round r of ``n_hashes`` hashes every query and key with angular LSH, ``h_r(x) = argmax([x R_r, -x R_r])``
(``R_r [D, n_buckets / 2]`` Gaussian), and a query attends, with plain softmax, to the keys that share its
bucket in at least one round:

    P_i = { j : exists r, h_r(q_i) = h_r(k_j) }  (and the pattern's rule, and not padding)
    out_i = sum_{j in P_i} exp(s_ij) v_j / sum_{j in P_i} exp(s_ij),   s_ij = scale * q_i . k_j

Choices where the paper is vague or does not fit attnkit:
- Exact bucket membership, not the paper's sorted chunks. The paper sorts by bucket, cuts the sorted sequence
  into equal chunks and lets a chunk see itself and the previous chunk: which keys a query sees then depends on
  every other token (including future ones in causal mode, and the length of the call). Here the set P_i
  depends only on q_i, k_j and the seed; the ``bucketed`` fast path computes exactly this set.
- Union over rounds: a pair shared in several rounds counts once (a union mask; the fast path counts a pair
  in the first round that shares it, which is what the paper's duplicate-count correction achieves).
- No shared-QK: attnkit passes q, k, v, so queries and keys are hashed with the same rotations (a layer that
  shares the q/k projection passes k = q and gets the paper's shared-QK buckets). Keys are not normalised
  (the hash looks only at directions) and a token may attend to itself: the paper's self-masking exists
  because with shared QK a token's score with itself dominates, which does not hold for separate q and k.
  Hence no ``shared_qk`` option; a query whose buckets hold no visible key outputs 0.
- ``n_buckets`` is an option, never derived from T (a length-dependent hash would make causal outputs depend
  on later tokens and chunked decoding differ from one call). The paper's choice (T / bucket size) is the
  caller's: ``n_buckets = T / 64`` at the length the model is trained on.
- Rotations are drawn once per module from ``seed`` (one draw per round, shared by all heads, so GQA equals
  repeating k, v); ``redraw()`` draws new ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidOption
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Paper, Shape, register_mechanism
from ..ops.bucketed import DEFAULT_BLOCK
from ..ops.lsh import query_key_buckets, random_rotations
from ..ops.reference import compute_dtype
from ..options import MAX_SEED, check_int
from ..patterns import Pattern
from ..state import KVCache
from ._grouped import GroupedAttention
from ._seeded import SeededDraws


@dataclass(frozen=True)
class ReformerOptions:
    n_buckets: int = 64  # LSH buckets per round (even); fixed, never derived from the length
    n_hashes: int = 4  # rounds of hashing; a query sees the keys sharing its bucket in any round
    seed: int | None = None  # the rotations are drawn from this seed; None: a seed drawn at create
    block_size: int = DEFAULT_BLOCK  # slots per block of the bucketed path (speed only)

    def __post_init__(self):
        check_int("reformer", "n_buckets", self.n_buckets, minimum=2)
        if self.n_buckets % 2:
            raise InvalidOption(
                f"reformer option n_buckets={self.n_buckets!r} is not valid; expected an even integer >= 2"
                " (angular LSH splits each rotation into +/- halves)"
            )
        check_int("reformer", "n_hashes", self.n_hashes, maximum=64)
        if self.seed is not None:
            check_int("reformer", "seed", self.seed, minimum=0, maximum=MAX_SEED)
        check_int("reformer", "block_size", self.block_size, maximum=4096)


@register_mechanism("reformer")
class Reformer(SeededDraws, GroupedAttention):
    family = "routed sparse"
    paper = Paper("Reformer: The Efficient Transformer", 2020, "2001.04451")
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})
    exact = False
    state_kind = KVCache
    complexity = Complexity(
        time="O(T·log T + T·(n_hashes·T / n_buckets)·D)", memory="O(T·n_hashes) + one chunk of blocks"
    )
    Options = ReformerOptions
    example_options = ({"n_buckets": 4, "n_hashes": 2, "seed": 1}, {"n_buckets": 16, "n_hashes": 1, "block_size": 8})
    fidelity_knob = ("n_hashes", (1, 2, 4, 8))

    # ---- hashing (shared by every path) --------------------------------------------------------------

    def rotations(self, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``R [n_hashes, dim, n_buckets / 2]`` of this module's seed (drawn on the CPU in fp64, then moved)."""
        o = self.options
        make = lambda gen: random_rotations(gen, dim, o.n_hashes, o.n_buckets).to(device=device, dtype=dtype)  # noqa: E731
        return self.drawn((dim, torch.device(device), dtype), make)

    def group_ids(self, x: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket of every query and key per round: ``[B, Hq, R, Tq]``, ``[B, Hq, R, Tk]`` (keys per query head)."""
        return query_key_buckets(x.q, x.k, self.rotations(x.q.shape[-1], x.q.device, compute_dtype(x.q.dtype)))

    def n_groups(self) -> int:
        return self.options.n_buckets

    # ---- costs ---------------------------------------------------------------------------------------

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        o = self.options
        hashing = 2.0 * (shape.tq * shape.heads + shape.tk * shape.kv_heads) * shape.dk * o.n_hashes * o.n_buckets / 2
        # expected keys per query under uniform buckets: each round a 1/n_buckets share, a union over rounds
        share = 1.0 - (1.0 - 1.0 / o.n_buckets) ** o.n_hashes
        keys = share * shape.tk * (0.5 if pattern is Pattern.CAUSAL_SELF else 1.0)
        attend = 2.0 * shape.heads * shape.tq * keys * (shape.dk + shape.dv)
        return shape.batch * (hashing + attend)
