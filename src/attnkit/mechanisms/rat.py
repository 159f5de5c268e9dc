"""RAT — RAT: Bridging RNN Efficiency and Attention Accuracy in Language Modeling (Wei et al., 2025,
arXiv:2507.04416; code: github.com/CLAIRE-Labo/RAT).

The sequence is cut into chunks of L tokens; token t is (c, l): chunk c, place l. Inside each chunk
a gated linear recurrence (started from zero) summarises keys and values; softmax attention runs
over the chunks' final summaries and the query's own partial one:

    k~_{c,l} = g_{c,l} * k~_{c,l-1} + (1 - g_{c,l}) * k_{c,l},   v~ likewise (same gate)
    y_{c,l}  = softmax([q_{c,l} . k~_{0,L-1}, ..., q_{c,l} . k~_{c-1,L-1}, q_{c,l} . k~_{c,l}] * scale) [v~ ...]

g = sigmoid(W_g [k; v] + b) per channel. In the paper g comes from a projection of the layer input;
here the mechanism only sees each head's k, v, so the gate is a learned per-head linear function of
them (``trainable = True``); b starts at log U(1, L-1) as in the authors' code. As there, gates and
recurrence are per query head even where heads share keys (GQA). The output gate and the rotary
encoding of chunk indices belong to the layer and are left out. noncausal_self attends to every
chunk's final summary. Chunks are counted over real (unpadded) tokens, so padding does not move chunk
boundaries. The ``chunk`` path runs the recurrence as a two-level O(T) scan and the attention as one
fused SDPA per block of queries: causal cost O(T^2/L * D). ``recurrent`` goes token by token
(decoding). The state keeps the chunk summaries (one more every L tokens: a KV cache L times smaller)
and the running recurrence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.gqa import repeat_kv
from ..ops.masking import masked_softmax
from ..ops.reference import compute_dtype
from ..ops.sdpa import sdpa
from ..ops.steps import RECURRENT_MAX_TOKENS, StepOutputs
from ..options import check_int
from ..patterns import Pattern
from ..state import State

SCAN_BLOCK = 16  # tokens per block of the two-level recurrence scan (a short loop, then a log-depth scan)
# Queries per block of the causal attention. Each block is one fused SDPA call over the chunk summaries it
# may see plus its queries' own partial summaries (a diagonal): larger blocks copy the summaries less
# often but add more diagonal keys. 128 measured best on the 2-core CPU at T = 4K-16K, L = 16.
QUERY_BLOCK = 128


@dataclass(frozen=True)
class RATOptions:
    chunk_size: int = 16  # L: tokens per chunk (L = 1: softmax attention of gated keys; L >= T: a pure RNN)

    def __post_init__(self):
        check_int("rat", "chunk_size", self.chunk_size)


@dataclass(frozen=True)
class RATState(State):
    """Decoding state (fp32; fp64 for fp64 inputs). Rows count their own real tokens (padding differs)."""

    chunks: torch.Tensor  # [B, N, Hq, 2, D] (k~, v~) of each completed chunk, left-aligned, zero past a row's count
    h: torch.Tensor  # [B, Hq, 2, D] the running recurrence (k~, v~) of the chunk in progress
    seen: torch.Tensor  # [B] int64 real tokens consumed per row (completed chunks: seen // L)


def linear_recurrence(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t along axis 1, from ``h0``: ``b [B, T, ...]``, ``a`` broadcastable to it,
    ``h0 [B, ...]``; returns ``[B, T, ...]``.

    Two levels: a loop over the SCAN_BLOCK places of every block at once (from zero), then a Hillis-Steele
    scan of the blocks' affine maps x -> A x + S for the state entering each block. O(T) work, autograd-safe.
    """
    bsz, t = b.shape[:2]
    s = min(SCAN_BLOCK, t)
    n = -(-t // s)

    def blocks(z: torch.Tensor, fill: float) -> torch.Tensor:  # [B, T, ...] -> [B, n, s, ...]
        z = F.pad(z, (0, 0) * (z.dim() - 2) + (0, n * s - t), value=fill)  # padding: identity steps
        return z.view(bsz, n, s, *z.shape[2:])

    a, b = blocks(a, 1.0), blocks(b, 0.0)
    loc, cum = [b[:, :, 0]], [a[:, :, 0]]
    for i in range(1, s):
        loc.append(a[:, :, i] * loc[-1] + b[:, :, i])
        cum.append(a[:, :, i] * cum[-1])
    loc, cum = torch.stack(loc, 2), torch.stack(cum, 2)  # [B, n, s, ...]
    # element 0 is the map that ignores its input and returns h0; element c + 1 is block c
    big_a = torch.cat([torch.zeros_like(cum[:, :1, -1]), cum[:, :, -1]], 1)  # [B, n + 1, ...]
    big_s = torch.cat([h0[:, None], loc[:, :, -1]], 1)
    step = 1
    while step < n + 1:  # compose each map with the one `step` before it
        big_s = torch.cat([big_s[:, :step], big_a[:, step:] * big_s[:, :-step] + big_s[:, step:]], 1)
        big_a = torch.cat([big_a[:, :step], big_a[:, step:] * big_a[:, :-step]], 1)
        step *= 2
    out = loc + cum * big_s[:, :-1, None]  # add what enters each block
    return out.reshape(bsz, n * s, *out.shape[3:])[:, :t]


@register_mechanism("rat")
class RAT(Mechanism):
    family = "hybrid"
    paper = Paper("RAT: Bridging RNN Efficiency and Attention Accuracy in Language Modeling", 2025, "2507.04416")
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})
    exact = False
    trainable = True
    state_kind = RATState
    complexity = Complexity(time="O(T²/L·D)", memory="O(T·D) forward (state O(T/L·D))")
    Options = RATOptions
    example_options = ({}, {"chunk_size": 3})
    fidelity_knob = ("chunk_size", (4, 16, 64))

    def __init__(self, heads: int | None = None, head_dim: int | None = None, **options):
        super().__init__(heads, head_dim, **options)
        fan_in = 2 * head_dim  # the gate reads [k; v]
        bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation
        self.gate_weight = nn.Parameter((torch.rand(heads, fan_in, head_dim) * 2 - 1) * bound)
        # authors' code: b = log U(1, L - 1), so sigmoid(b) starts in [1/2, 1 - 1/L]
        top = max(self.options.chunk_size - 1, 1)
        self.gate_bias = nn.Parameter(torch.log(1 + torch.rand(heads, head_dim) * (top - 1)))

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        dk, dv = x.k.shape[-1], x.v.shape[-1]
        if dk != self.head_dim or dv != self.head_dim:
            raise ShapeError(
                f"rat was created for head_dim {self.head_dim} (one gate per channel of k and v);"
                f" got k head dim {dk} and v head dim {dv}"
            )

    # ---- shared pieces -----------------------------------------------------------------------------

    @staticmethod
    def compute_dtype(x: AttentionInputs) -> torch.dtype:
        return compute_dtype(x.q.dtype)

    def _prepare(self, x: AttentionInputs):
        """Per query head: ``kv = (k, v)`` ``[B, T, H, 2, D]``, the gate ``g [B, T, H, 1, D]`` (channel d gates k~_d
        and v~_d), ``real [B, T]`` and ``before [B, T]``: the row's real tokens before t, earlier calls included."""
        cd = self.compute_dtype(x)
        kv = torch.stack([repeat_kv(x.k, x.groups), repeat_kv(x.v, x.groups)], 3).to(cd)  # [B, T, H, 2, D]
        logits = torch.einsum("bthe,hed->bthd", kv.flatten(3), self.gate_weight.to(cd)) + self.gate_bias.to(cd)
        g = torch.sigmoid(logits)[:, :, :, None]  # [B, T, H, 1, D]
        real = x.key_padding_mask
        if real is None:
            real = torch.ones(x.batch, x.tk, dtype=torch.bool, device=kv.device)
        seen0 = x.state.seen if x.state is not None else torch.zeros(x.batch, dtype=torch.long, device=kv.device)
        before = seen0[:, None] + real.long().cumsum(1) - real.long()  # [B, T]
        return kv, g, real, before, seen0

    def _start_h(self, x: AttentionInputs, kv: torch.Tensor) -> torch.Tensor:
        if x.state is None:
            return kv.new_zeros(x.batch, *kv.shape[2:])  # [B, H, 2, D]
        return x.state.h.to(kv.dtype)

    def _old_chunks(self, x: AttentionInputs, kv: torch.Tensor) -> torch.Tensor:
        if x.state is None:
            return kv.new_zeros(x.batch, 0, *kv.shape[2:])  # [B, 0, H, 2, D]
        return x.state.chunks.to(kv.dtype)

    # ---- the specification -------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        L = self.options.chunk_size
        kv, g, real, before, seen0 = self._prepare(x)
        # intra-chunk RNN, token by token; a real token whose chunk is new starts from zero
        h, hs = self._start_h(x, kv), []
        for t in range(x.tk):
            first = (before[:, t] % L == 0)[:, None, None, None]  # [B, 1, 1, 1]
            step = torch.where(first, 0.0, g[:, t] * h) + (1 - g[:, t]) * kv[:, t]
            h = torch.where(real[:, t, None, None, None], step, h)  # a padded token leaves the state alone
            hs.append(h)
        hs = torch.stack(hs, 1)  # [B, T, H, 2, D]
        upto = before + real.long()  # real tokens up to and including t
        ends = real & (upto % L == 0)  # [B, T] the token completes its chunk
        if x.pattern is Pattern.CAUSAL_SELF:
            chunk_q = before // L  # [B, T] chunk of query t (padding: the chunk the next real token joins)
            old = self._old_chunks(x, kv)  # [B, N0, H, 2, D]
            old_ok = torch.arange(old.shape[1], device=kv.device)[None] < (seen0 // L)[:, None]  # [B, N0]
            # keys: the completed chunks of earlier calls, then every token's h (visible where allowed)
            keys = torch.cat([old, hs], 1)  # [B, N0 + T, H, 2, D]
            to_old = old_ok[:, None, :].expand(-1, x.tq, -1)  # [B, Tq, N0]
            finished = ends[:, None, :] & ((upto[:, None, :] - 1) // L < chunk_q[:, :, None])  # [B, Tq, Tk]
            own = torch.eye(x.tq, dtype=torch.bool, device=kv.device) & (upto > chunk_q * L)[:, :, None]
            seen = torch.cat([to_old, finished | own], -1)[:, None]  # [B, 1, Tq, N0 + Tk]
        else:
            keys = hs  # every chunk's final summary: chunk ends and the row's last real token
            final = real & ((upto % L == 0) | (upto == upto[:, -1:]))  # [B, T]
            seen = final[:, None, None, :]  # [B, 1, 1, T]
        q = x.q.to(kv.dtype)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, keys[:, :, :, 0]) * x.scale  # [B, H, Tq, keys]
        probs = masked_softmax(scores, seen)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, keys[:, :, :, 1])  # [B, Tq, H, Dv]
        state = None
        if x.want_state:
            rows = [torch.cat([old[b, : int(seen0[b]) // L], hs[b, ends[b]]]) for b in range(x.batch)]
            state = self._state(x, rows, hs[:, -1], upto[:, -1])
        return out.to(x.q.dtype), state

    def _state(self, x: AttentionInputs, rows: list[torch.Tensor], h: torch.Tensor, seen: torch.Tensor) -> RATState:
        """Stack each row's completed chunks ``[n_b, H, 2, D]`` left-aligned, zero-padded to the longest."""
        n = max(r.shape[0] for r in rows)
        chunks = torch.stack([F.pad(r, (0, 0, 0, 0, 0, 0, 0, n - r.shape[0])) for r in rows])  # [B, N, H, 2, D]
        return RATState(offset=x.tq + (x.state.offset if x.state else 0), chunks=chunks, h=h, seen=seen)

    # ---- fast path ---------------------------------------------------------------------------------

    @fast_path("chunk", priority=10)
    def chunk(self, x: AttentionInputs):
        """The recurrence as a two-level scan, then one fused SDPA per block of queries."""
        L = self.options.chunk_size
        kv, g, real, before, seen0 = self._prepare(x)
        go_on = (real & (before % L != 0)).to(kv.dtype)[..., None, None, None]  # [B, T, 1, 1, 1] not a chunk start
        a = (
            g * go_on
            if x.key_padding_mask is None
            else torch.addcmul((~real).to(kv.dtype)[..., None, None, None], g, go_on)
        )
        b = (1 - g) * kv if x.key_padding_mask is None else (1 - g) * kv * real[..., None, None, None]
        hs = linear_recurrence(a, b, self._start_h(x, kv))  # [B, T, H, 2, D]; padding: a = 1, b = 0
        upto = before + real.long()  # [B, T] nondecreasing: the chunk ends are found by binary search
        if x.pattern is Pattern.NONCAUSAL_SELF:
            return self._noncausal(x, hs, upto), None
        n0 = seen0 // L  # [B] chunks completed before this call
        n_new = (x.tk + L - 1) // L  # at most this many complete in this call
        target = (n0[:, None] + 1 + torch.arange(n_new, device=kv.device)[None]) * L  # [B, Nn]
        ends = torch.searchsorted(upto, target)  # [B, Nn] the token that completes each chunk (T: none)
        new = hs.gather(1, ends.clamp(max=x.tk - 1)[..., None, None, None].expand(-1, -1, *hs.shape[2:]))
        old = self._old_chunks(x, kv)
        n_old = old.shape[1]
        slot = torch.arange(n_old + n_new, device=kv.device)[None]  # [1, S] summaries: earlier calls', then this call's
        slot_chunk = torch.where(slot < n_old, slot, n0[:, None] + slot - n_old)  # [B, S] chunk number
        slot_ok = (slot >= n_old) | (slot < n0[:, None])  # old slots past the row's count are padding
        chunk_q = before // L  # [B, T]
        own_ok = upto > chunk_q * L  # [B, T] the query's own chunk has begun
        q, outs = x.q.to(kv.dtype), []
        for t0 in range(0, x.tq, QUERY_BLOCK):
            t1 = min(x.tq, t0 + QUERY_BLOCK)
            s = n_old + min(n_new, (t1 + L - 2) // L)  # slots any query of the block may see
            seen = slot_ok[:, None, :s] & (slot_chunk[:, None, :s] < chunk_q[:, t0:t1, None])  # [B, Tb, s]
            own = torch.eye(t1 - t0, dtype=torch.bool, device=kv.device) & own_ok[:, t0:t1, None]  # [B, Tb, Tb]
            kb = torch.cat([old, new[:, : s - n_old], hs[:, t0:t1]], 1)  # [B, s + Tb, H, 2, D]: own partials last
            mask = torch.cat([seen, own], -1)[:, None]  # [B, 1, Tb, s + Tb]
            outs.append(sdpa(q[:, t0:t1], kb[:, :, :, 0], kb[:, :, :, 1], scale=x.scale, mask=mask))
        sees = (own_ok | (chunk_q > 0))[..., None, None]  # every completed chunk has a real token
        out = torch.where(sees, torch.cat(outs, 1), 0.0).to(x.q.dtype)  # [B, T, H, Dv]; no key seen: zeros
        state = None
        if x.want_state:
            done = upto[:, -1] // L - n0  # [B] chunks completed in this call
            if x.state is not None and not bool(done.any()):  # inside a chunk: keep the chunks, no copy
                state = RATState(x.tq + x.state.offset, x.state.chunks, hs[:, -1], upto[:, -1])
            else:
                rows = [torch.cat([old[b, : int(n0[b])], new[b, : int(done[b])]]) for b in range(x.batch)]
                state = self._state(x, rows, hs[:, -1], upto[:, -1])
        return out, state

    @fast_path("recurrent", priority=lambda mech, x: 20 if x.tq <= RECURRENT_MAX_TOKENS else 0)
    def recurrent(self, x: AttentionInputs):
        """Token by token (decoding): update the running summary, attend to the chunk cache and it, and
        move the summary into the cache when its chunk completes."""
        L = self.options.chunk_size
        kv, g, real, before, seen0 = self._prepare(x)
        h, chunks, count = self._start_h(x, kv), self._old_chunks(x, kv), seen0 // L  # count: [B] chunks per row
        q, outs = x.q.to(kv.dtype), StepOutputs(x.tq)
        for t in range(x.tq):
            first = (before[:, t] % L == 0)[:, None, None, None]
            h = torch.where(
                real[:, t, None, None, None], torch.where(first, 0.0, g[:, t] * h) + (1 - g[:, t]) * kv[:, t], h
            )
            slots = torch.arange(chunks.shape[1], device=kv.device)[None] < count[:, None]  # [B, N]
            own_ok = before[:, t] + real[:, t].long() > (before[:, t] // L) * L  # [B] its chunk has begun
            scores = (
                torch.cat(
                    [
                        torch.einsum("bhd,bnhd->bhn", q[:, t], chunks[:, :, :, 0]),
                        (q[:, t] * h[:, :, 0]).sum(-1)[..., None],
                    ],
                    -1,
                )
                * x.scale
            )  # [B, H, N + 1]
            p = masked_softmax(scores, torch.cat([slots, own_ok[:, None]], -1)[:, None])
            outs.add(t, torch.einsum("bhn,bnhd->bhd", p[..., :-1], chunks[:, :, :, 1]) + p[..., -1:] * h[:, :, 1])
            done = real[:, t] & ((before[:, t] + 1) % L == 0)  # [B] this token completes its chunk
            if bool(done.any()):
                if int((count + done.long()).max()) > chunks.shape[1]:
                    chunks = F.pad(chunks, (0, 0, 0, 0, 0, 0, 0, 1))  # room for one more chunk
                at = (torch.arange(chunks.shape[1], device=kv.device)[None] == count[:, None]) & done[:, None]
                chunks = torch.where(at[..., None, None, None], h[:, None], chunks)  # [B, N, H, 2, D]
                count = count + done.long()
        out = outs.stacked().to(x.q.dtype)  # [B, T, H, Dv]
        state = None
        if x.want_state:
            state = RATState(x.tq + (x.state.offset if x.state else 0), chunks, h, before[:, -1] + real[:, -1].long())
        return out, state

    @recurrent.unsupported
    def recurrent(self, x: AttentionInputs) -> list[str]:
        return [] if x.pattern is Pattern.CAUSAL_SELF else [f"recurrent is for causal_self; got {x.pattern.value}"]

    def _noncausal(self, x: AttentionInputs, hs: torch.Tensor, upto: torch.Tensor) -> torch.Tensor:
        """Every query attends to every chunk's final summary (a fused SDPA over ceil(T/L) keys)."""
        L = self.options.chunk_size
        n = (x.tk + L - 1) // L
        target = (1 + torch.arange(n, device=hs.device))[None] * L  # [1, n]
        ends = torch.searchsorted(upto, target.expand(x.batch, -1).contiguous()).clamp(max=x.tk - 1)
        keys = hs.gather(1, ends[..., None, None, None].expand(-1, -1, *hs.shape[2:]))  # [B, n, H, 2, D]
        ok = torch.arange(n, device=hs.device)[None] * L < upto[:, -1:]  # [B, n] the chunk has a real token
        out = sdpa(x.q.to(hs.dtype), keys[:, :, :, 0], keys[:, :, :, 1], scale=x.scale, mask=ok[:, None, None])
        return torch.where(ok.any(1)[:, None, None, None], out, 0.0).to(x.q.dtype)  # no real key: zeros

    # ---- state and costs ---------------------------------------------------------------------------

    def empty_state(self, batch, kv_heads, dk, dv, *, device=None, dtype=torch.float32) -> RATState:
        dtype = compute_dtype(dtype)
        return RATState(
            offset=0,
            chunks=torch.zeros(batch, 0, self.heads, 2, dv, device=device, dtype=dtype),
            h=torch.zeros(batch, self.heads, 2, dv, device=device, dtype=dtype),
            seen=torch.zeros(batch, dtype=torch.long, device=device),
        )

    def check_state(self, state: State, k: torch.Tensor, v: torch.Tensor) -> None:
        assert isinstance(state, RATState)
        want, got = (k.shape[0], self.heads, 2, v.shape[-1]), tuple(state.h.shape)
        state.check_fits("batch, heads, (k, v), dv", got, want, k.device)

    def state_bytes(self, shape: Shape, dtype: torch.dtype = torch.float32) -> int:
        elt = 8 if dtype == torch.float64 else 4
        per_chunk = shape.batch * shape.heads * (shape.dk + shape.dv) * elt
        return per_chunk * (shape.tk // self.options.chunk_size + 1) + shape.batch * 8  # chunks, h, seen

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        L, e = self.options.chunk_size, shape.dk + shape.dv
        gate_and_scan = 2.0 * shape.tk * e * shape.dk + 4.0 * shape.tk * e
        n = -(-shape.tk // L)
        pairs = shape.tq * n / 2 + shape.tq if pattern is Pattern.CAUSAL_SELF else shape.tq * n
        return shape.batch * shape.heads * (gate_and_scan + 2.0 * pairs * e)
