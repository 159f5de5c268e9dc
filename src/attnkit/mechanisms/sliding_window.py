"""Sliding-window (local) attention — Longformer: The Long-Document Transformer (Beltagy et al., 2020,
arXiv:2004.05150), the local part.

    out_i = sum_{j in W(i)} softmax_j(scale * q_i . k_j) v_j
    causal:    W(i) = { j : 0 <= i - j < window }   (the last `window` keys, itself included)
    noncausal: W(i) = { j : |i - j| < window }

Exact softmax over the window. The ``blocked`` path cuts queries into blocks that attend to their
band of keys in one batched SDPA call: O(T * window) time and memory. Decoding keeps a bounded
window cache of the last ``window - 1`` keys. While the window covers much of the sequence, the
``dense`` path (SDPA with a window mask) is faster and ``auto`` takes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.banded import band_pairs, banded_attention
from ..ops.reference import dense_softmax_attention
from ..ops.sdpa import masked_sdpa
from ..options import check_int
from ..patterns import Pattern
from ..patterns import window as window_predicate
from ..state import WindowCache


@dataclass(frozen=True)
class SlidingWindowOptions:
    window: int = 256  # keys at distance < window are visible (causal: the last `window` keys)

    def __post_init__(self):
        check_int("sliding_window", "window", self.window)


@register_mechanism("sliding_window")
class SlidingWindow(Mechanism):
    family = "fixed sparse"
    paper = Paper("Longformer: The Long-Document Transformer", 2020, "2004.05150")
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})
    exact = True
    heads_independent = True
    state_kind = WindowCache
    complexity = Complexity(time="O(T·window·D)", memory="O(T·window)")
    Options = SlidingWindowOptions
    example_options = ({"window": 4}, {"window": 64})
    fidelity_knob = ("window", (16, 64, 256))

    def window_size(self) -> int:
        return self.options.window

    def _predicate(self, x: AttentionInputs):
        return window_predicate(self.options.window, causal=x.pattern is Pattern.CAUSAL_SELF)

    def reference(self, x: AttentionInputs):
        # softmax over the keys in the window (and the pattern, and not padded)
        return dense_softmax_attention(x, self._predicate(x)), None

    # Dense SDPA with a window mask wins while the band covers much of the matrix (measured on the
    # 2-core CPU, window 256: dense is faster up to T ~ 2 * window, blocked beyond).
    @fast_path("dense", priority=lambda mech, x: 20 if x.tk <= 2 * mech.options.window else 0)
    def dense(self, x: AttentionInputs):
        covers_all = self.options.window >= x.tk  # every key the pattern allows is in the window
        return masked_sdpa(x, None if covers_all else self._predicate(x)), None

    @fast_path("blocked", priority=10)
    def blocked(self, x: AttentionInputs):
        w = self.options.window
        after = 0 if x.pattern is Pattern.CAUSAL_SELF else w - 1
        out = banded_attention(
            x.q,
            x.k,
            x.v,
            before=w - 1,
            after=after,
            scale=x.scale,
            q_offset=x.q_offset,
            key_padding_mask=x.key_padding_mask,
        )
        return out, None

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        w = self.options.window
        after = 0 if pattern is Pattern.CAUSAL_SELF else w - 1
        pairs = band_pairs(shape.tq, w - 1, after)
        return 2.0 * shape.batch * shape.heads * pairs * (shape.dk + shape.dv)
