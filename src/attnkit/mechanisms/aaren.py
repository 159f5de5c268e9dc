"""Aaren — Attention as an RNN (Feng et al., 2024, arXiv:2405.13956).

    s_j = scale * q . k_j        (q: one learned query per head, independent of the input)
    o_t = sum_{j<=t} exp(s_j - m_t) v_j / sum_{j<=t} exp(s_j - m_t),     m_t = max_{j<=t} s_j

Because the query does not depend on the input, o_t is a many-to-many RNN whose state is the triple
(m, u, w) = (running max, denominator, numerator); two partial states combine associatively:
(m_A, u_A, w_A) + (m_B, u_B, w_B) = (m, u_A e^(m_A - m) + u_B e^(m_B - m), w_A e^(m_A - m) + w_B e^(m_B - m)),
m = max(m_A, m_B). That gives the parallel prefix scan for training and O(1) state for decoding.

Interface choice: the query is a learned parameter ``query [heads, head_dim]`` (``trainable = True``);
the ``q`` argument only fixes the shapes, dtype and device. Mixing an input-dependent query in (say
``query + q_t``) would make the scores depend on t, which is exactly what breaks the RNN form
(state O(1), prefix scan) that defines Aaren; a layer that wants input-dependent queries wants softmax
attention. ``q`` joins the autograd graph with weight 0, so its gradient is an explicit zero (the
true d out / d q) rather than None: a layer's query projection then gets a zero gradient, as
optimisers and DistributedDataParallel expect of a parameter that took part in the forward.

Paths: the reference is the explicit masked softmax over each prefix. ``scan`` is an O(T) chunked
scan: each chunk's own (m, u, w), a log-depth Hillis-Steele scan of those triples across the T/C
chunks, then C RNN steps that run inside every chunk at once from the state before it: O(T*(Dk+Dv))
work, O(T*Dv) memory, no T x T tensor. ``recurrent`` is the token-by-token RNN (decoding). Padded keys
get score -inf: they change neither m nor u, w.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.gqa import repeat_kv
from ..ops.masking import masked_softmax, visibility
from ..ops.reference import compute_dtype
from ..ops.steps import RECURRENT_MAX_TOKENS, StepOutputs
from ..options import check_int
from ..patterns import Pattern
from ..state import State

NEG_INF = float("-inf")


@dataclass(frozen=True)
class AarenOptions:
    chunk_size: int = 64  # tokens per chunk of the scan path (speed only; 64 measured fastest on 2 CPU cores)

    def __post_init__(self):
        check_int("aaren", "chunk_size", self.chunk_size)


@dataclass(frozen=True)
class AarenState(State):
    """The RNN state after the tokens seen so far: o = w / u (fp32; fp64 for fp64 inputs)."""

    m: torch.Tensor  # [B, Hq] running max of the scores (-inf while no real key was seen)
    u: torch.Tensor  # [B, Hq] sum_j exp(s_j - m)
    w: torch.Tensor  # [B, Hq, Dv] sum_j exp(s_j - m) v_j


def _shift(m: torch.Tensor) -> torch.Tensor:
    """A max usable as an exponent shift: -inf (nothing seen yet) becomes 0, so exp(-inf - 0) = 0, no NaN."""
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


def combine(a: tuple, b: tuple) -> tuple:
    """The associative operator on (m, u, w) triples, ``a`` before ``b``; m [...], u [...], w [..., Dv]."""
    (ma, ua, wa), (mb, ub, wb) = a, b
    m = torch.maximum(ma, mb)
    fa, fb = torch.exp(ma - _shift(m)), torch.exp(mb - _shift(m))
    return m, ua * fa + ub * fb, wa * fa[..., None] + wb * fb[..., None]


def prefix_scan(m: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> tuple:
    """Inclusive Hillis-Steele scan over axis -1 of m, u (axis -2 of w) in ceil(log2 n) steps."""
    n, step = m.shape[-1], 1
    while step < n:  # element i absorbs element i - step
        earlier = (m[..., :-step], u[..., :-step], w[..., :-step, :])
        mc, uc, wc = combine(earlier, (m[..., step:], u[..., step:], w[..., step:, :]))
        m = torch.cat([m[..., :step], mc], dim=-1)
        u = torch.cat([u[..., :step], uc], dim=-1)
        w = torch.cat([w[..., :step, :], wc], dim=-2)
        step *= 2
    return m, u, w


def _with_q(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``out`` unchanged, with ``q`` joined to the graph at weight 0 (its gradient is zero, not None)."""
    if not (torch.is_grad_enabled() and q.requires_grad):
        return out
    never = torch.zeros((), dtype=torch.bool, device=q.device)
    return out + torch.where(never, q.reshape(-1)[0], 0.0).to(out.dtype)  # exactly 0 even if q holds inf


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where nothing real was seen. u is 0 (then w = 0) or >= 1 (the max's own term is
    e^0 = 1), so clamping it at 1 changes nothing else and keeps values and gradients finite."""
    return num / den.clamp_min(1.0)[..., None]


def _step(m, u, w, s, v) -> tuple:
    """One RNN step for every (row, head[, chunk]): m' = max(m, s), u' = u e^(m - m') + e^(s - m'), w' likewise.

    ``m, u, s [...]``, ``w, v [..., Dv]``. The shift m' is detached (see the note above the fast paths).
    """
    m_new = torch.maximum(m, s.detach())
    keep, add = torch.exp(m - _shift(m_new)), torch.exp(s - _shift(m_new))
    return m_new, u * keep + add, torch.addcmul(w * keep[..., None], add[..., None], v)


@register_mechanism("aaren")
class Aaren(Mechanism):
    family = "recurrent softmax"
    paper = Paper("Attention as an RNN", 2024, "2405.13956")
    patterns = frozenset({Pattern.CAUSAL_SELF})
    exact = False  # softmax attention, but of a learned query, not of q
    trainable = True
    state_kind = AarenState
    complexity = Complexity(time="O(T·D)", memory="O(T·D) (state O(D))")
    Options = AarenOptions
    example_options = ({}, {"chunk_size": 5})

    def __init__(self, heads: int | None = None, head_dim: int | None = None, **options):
        super().__init__(heads, head_dim, **options)
        # the learned query token, one per head; N(0, 1) so that scale * query . k has unit variance
        self.query = nn.Parameter(torch.randn(heads, head_dim))

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        if x.q.shape[-1] != self.head_dim:
            raise ShapeError(f"aaren was created for head_dim {self.head_dim}; got q, k with head dim {x.q.shape[-1]}")

    # ---- shared pieces -----------------------------------------------------------------------------

    @staticmethod
    def compute_dtype(x: AttentionInputs) -> torch.dtype:
        return compute_dtype(x.q.dtype)

    def scores(self, x: AttentionInputs) -> torch.Tensor:
        """s_j = scale * query . k_j per query head, -inf at padded keys: ``[B, Hq, Tk]``."""
        cd = self.compute_dtype(x)
        k = repeat_kv(x.k, x.groups).to(cd)  # [B, Tk, Hq, Dk]
        s = torch.einsum("hd,bkhd->bhk", self.query.to(cd), k) * x.scale  # [B, Hq, Tk]
        if x.key_padding_mask is not None:
            s = s.masked_fill(~x.key_padding_mask[:, None, :], NEG_INF)
        return s

    def _start(self, x: AttentionInputs, dtype: torch.dtype) -> tuple:
        st = x.state
        if st is None:
            st = self.init_state(x.batch, x.kv_heads, x.k.shape[-1], x.v.shape[-1], device=x.q.device, dtype=dtype)
        return st.m.to(dtype), st.u.to(dtype), st.w.to(dtype)

    def _new_state(self, x: AttentionInputs, m, u, w) -> AarenState:
        offset = x.tq + (x.state.offset if x.state is not None else 0)
        return AarenState(offset=offset, m=m, u=u, w=w)

    # ---- the specification -------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        cd = self.compute_dtype(x)
        s = self.scores(x)  # [B, H, T]
        v = repeat_kv(x.v, x.groups).to(cd).transpose(1, 2)  # [B, H, T, Dv]
        scores = s[:, :, None, :].expand(-1, -1, x.tq, -1)  # [B, H, Tq, Tk]: the same scores for every t
        seen = visibility(x)  # [B|1, 1, Tq, Tk] causal and padding
        if seen is None:
            seen = torch.ones(1, 1, x.tq, x.tk, dtype=torch.bool, device=s.device)
        m0, u0, w0 = self._start(x, cd)
        # the earlier calls' tokens, as one key: its weight e^m0 u0 and its value w0 / u0 give the
        # same softmax as the keys it summarises
        past = u0 > 0  # [B, H]
        past_score = torch.where(past, m0 + torch.log(torch.where(past, u0, 1.0)), NEG_INF)  # [B, H]
        past_value = w0 / torch.where(past, u0, 1.0)[..., None]  # [B, H, Dv] (0 when nothing was seen)
        scores = torch.cat([past_score[:, :, None, None].expand(-1, -1, x.tq, 1), scores], dim=-1)
        seen = torch.cat([past[:, :, None, None].expand(-1, -1, x.tq, 1), seen.expand(x.batch, x.heads, -1, -1)], -1)
        probs = masked_softmax(scores, seen)  # [B, H, Tq, 1 + Tk]
        out = probs[..., :1] * past_value[:, :, None, :] + probs[..., 1:] @ v  # [B, H, Tq, Dv]
        state = None
        if x.want_state:  # m = max over every real key; u, w relative to it
            m = torch.maximum(m0, s.amax(-1))  # [B, H]
            e = torch.exp(s - _shift(m)[..., None])  # [B, H, T]
            carry = torch.exp(m0 - _shift(m))
            w = w0 * carry[..., None] + torch.einsum("bht,bhtd->bhd", e, v)  # [B, H, Dv]
            state = self._new_state(x, m, u0 * carry + e.sum(-1), w)
        return _with_q(out.transpose(1, 2).to(x.q.dtype), x.q), state

    # ---- fast paths --------------------------------------------------------------------------------
    # The shift m only keeps exp() in range: outputs do not depend on it, so it is detached
    # (consistently, including the m a state hands on): gradients stay exact and cheaper.

    @fast_path("scan", priority=10)
    def scan(self, x: AttentionInputs):
        cd = self.compute_dtype(x)
        b, t, h = x.batch, x.tq, x.heads
        c = max(1, min(self.options.chunk_size, t))
        n = -(-t // c)  # chunks
        s = torch.nn.functional.pad(self.scores(x), (0, n * c - t), value=NEG_INF).view(b, h, n, c)
        v = repeat_kv(x.v, x.groups).to(cd).transpose(1, 2)  # [B, H, T, Dv]
        v = torch.nn.functional.pad(v, (0, 0, 0, n * c - t)).view(b, h, n, c, -1)  # [B, H, n, C, Dv]
        # each chunk's own (m, u, w)
        mc = s.detach().amax(-1)  # [B, H, n]
        e = torch.exp(s - _shift(mc)[..., None])  # [B, H, n, C]
        uc, wc = e.sum(-1), (e[..., None, :] @ v).squeeze(-2)  # [B, H, n], [B, H, n, Dv]
        # the state before each chunk: an exclusive scan, with the incoming state as element 0
        m0, u0, w0 = self._start(x, cd)
        mb, ub, wb = prefix_scan(
            torch.cat([m0[..., None], mc], -1), torch.cat([u0[..., None], uc], -1), torch.cat([w0[:, :, None], wc], -2)
        )  # [B, H, n + 1]: element i = everything before chunk i
        # inside each chunk: the RNN from the state before the chunk, every chunk at once (C steps)
        m, u, w = mb[..., :-1], ub[..., :-1], wb[..., :-1, :]  # [B, H, n], [B, H, n, Dv]
        nums, dens = [], []
        for i in range(c):
            m, u, w = _step(m, u, w, s[..., i], v[..., i, :])
            nums.append(w)
            dens.append(u)
        out = _ratio(torch.stack(nums, 3), torch.stack(dens, 3)).reshape(b, h, n * c, -1)[:, :, :t]  # [B, H, T, Dv]
        state = self._new_state(x, mb[..., -1], ub[..., -1], wb[..., -1, :]) if x.want_state else None
        return _with_q(out.transpose(1, 2).to(x.q.dtype), x.q), state

    @fast_path("recurrent", priority=lambda mech, x: 20 if x.tq <= RECURRENT_MAX_TOKENS else 0)
    def recurrent(self, x: AttentionInputs):
        """The RNN, one token at a time: m' = max(m, s_t), u' = u e^(m - m') + e^(s_t - m'), w' likewise."""
        cd = self.compute_dtype(x)
        s = self.scores(x)  # [B, H, T]
        v = repeat_kv(x.v, x.groups).to(cd)  # [B, T, H, Dv]
        m, u, w = self._start(x, cd)
        outs = StepOutputs(x.tq)
        for i in range(x.tq):
            m, u, w = _step(m, u, w, s[:, :, i], v[:, i])
            outs.add(i, _ratio(w, u))
        out = outs.stacked()  # [B, T, H, Dv]
        return _with_q(out.to(x.q.dtype), x.q), (self._new_state(x, m, u, w) if x.want_state else None)

    # ---- state and costs ---------------------------------------------------------------------------

    def empty_state(self, batch, kv_heads, dk, dv, *, device=None, dtype=torch.float32) -> AarenState:
        dtype = compute_dtype(dtype)
        return AarenState(
            offset=0,
            m=torch.full((batch, self.heads), NEG_INF, device=device, dtype=dtype),
            u=torch.zeros(batch, self.heads, device=device, dtype=dtype),
            w=torch.zeros(batch, self.heads, dv, device=device, dtype=dtype),
        )

    def check_state(self, state: State, k: torch.Tensor, v: torch.Tensor) -> None:
        assert isinstance(state, AarenState)
        want, got = (k.shape[0], self.heads, v.shape[-1]), tuple(state.w.shape)
        state.check_fits("batch, heads, dv", got, want, k.device)

    def state_bytes(self, shape: Shape, dtype: torch.dtype = torch.float32) -> int:
        elt = 8 if dtype == torch.float64 else 4
        return shape.batch * shape.heads * (2 + shape.dv) * elt  # m, u and w: independent of T

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        # per token and head: the score (Dk multiply-adds) and the numerator update (Dv)
        return 2.0 * shape.batch * shape.heads * shape.tk * (shape.dk + shape.dv)
