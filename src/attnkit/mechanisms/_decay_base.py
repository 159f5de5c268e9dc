"""The base of the decay family (retention, lightning): decayed linear attention with one decay per
query head and no normaliser. Not a mechanism itself (private module: not registered, not discovered)."""

from __future__ import annotations

import torch

from ..errors import ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Shape
from ..ops.gqa import repeat_kv
from ..patterns import Pattern
from ..state import RecurrentState, State
from ._kernel_base import KernelAttention


class HeadwiseDecay(KernelAttention):
    """Decayed linear attention with one decay per query head and no normaliser (not registered itself).

    The base of ``retention`` and ``lightning``. Under GQA every query head keeps its own decay, so it
    keeps its own state: k, v are repeated to the query heads before any path runs (as fla's
    MultiScaleRetention does), and the recurrent state is ``S [B, Hq, F, Dv]``. A decay per kv head
    could not give each query head of a group its own scale.
    """

    normalised = False
    decays = True
    patterns = frozenset({Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_SELF})

    def head_log_decays(self, heads: int) -> torch.Tensor:
        """``log gamma_h`` (<= 0) of query heads ``h = 0..heads-1``, float64 ``[heads]``."""
        raise NotImplementedError

    def log_decay(self, x: AttentionInputs) -> torch.Tensor:
        # after join_cache, x has one kv head per query head
        return self.head_log_decays(x.heads).to(device=x.q.device, dtype=self.compute_dtype(x))

    # ---- GQA and state: one state per query head ----------------------------------------------------

    def join_cache(self, x: AttentionInputs) -> tuple[AttentionInputs, State | None]:
        """Repeat k, v to the query heads (GQA) so that every query head has its own decay and state."""
        if x.groups > 1:
            x = x.replace(k=repeat_kv(x.k, x.groups), v=repeat_kv(x.v, x.groups))
        return x, None

    def check_state(self, state: State, k: torch.Tensor, v: torch.Tensor) -> None:
        assert isinstance(state, RecurrentState)
        b, _, hkv, dk = k.shape
        got = tuple(state.S.shape)
        if got[0] != b or got[2:] != (self.state_dk(dk), v.shape[-1]) or got[1] % hkv:
            raise ShapeError(
                f"state does not fit the inputs: it holds (batch, heads, dk, dv) = {got}, the call has batch {b}, "
                f"{hkv} kv heads, dk {dk}, dv {v.shape[-1]} ({self.name} keeps one state per query head)"
            )
        if state.S.device != k.device:
            raise ShapeError(f"state is on {state.S.device} but k is on {k.device}")

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        if x.state is not None and x.state.S.shape[1] != x.heads:
            raise ShapeError(
                f"state does not fit the inputs: it holds {x.state.S.shape[1]} heads, q has {x.heads} "
                f"({self.name} keeps one state per query head)"
            )
        self.head_log_decays(x.heads)  # an option sized for other head counts raises here

    def state_bytes(self, shape: Shape, dtype: torch.dtype = torch.float32) -> int:
        f = self.state_dk(shape.dk)
        return RecurrentState.zeros(shape.batch, shape.heads, f, shape.dv, normalised=False, device="meta").nbytes

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        scan = super().flops(shape._replace(kv_heads=shape.heads), Pattern.CAUSAL_SELF)
        return scan if pattern is Pattern.CAUSAL_SELF else 2 * scan  # noncausal: a forward and a backward scan
