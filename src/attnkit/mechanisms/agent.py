"""Agent attention — Agent Attention: On the Integration of Softmax and Linear Attention (Han et al., 2023,
arXiv:2312.08874), on 1-D sequences and, with ``spatial_shape=(h, w)``, on 2-D grids as in the paper.

n agent tokens A, pooled from the queries, first gather from the keys, then broadcast to the queries:

    A = pool(Q) [n, D],   V_A = softmax(s A K^T) V [n, Dv],   O = softmax(s Q A^T) V_A + DWC(V)

DWC is a depthwise convolution over the tokens of v (trainable, no bias), the paper's diversity term. Choices
where the paper is vague (it defines the 2-D form only):
- 1-D pooling: agents are means over contiguous segments of the real tokens (``ops/low_rank``; ragged when n does
  not divide T, each token its own agent when T < n, the empty agents drop out); the DWC has ``kernel_size`` taps.
- The agent bias (the paper's 2-D positional biases on both softmaxes) is left out, in both forms. A query that
  sees no real key then gives 0. A padded position of a self pattern is no token: its output is 0.
- causal_self (no future): the tokens are cut into blocks of ``block_size`` real tokens; agent c is the mean
  of the queries of block c and gathers from the keys up to the end of its block. Query i (in block c_i) takes
  one softmax over the agents of the completed blocks c < c_i (keys: the agents, values: their V_A) and the
  keys of its own block up to itself (exact local attention), plus a causal DWC (taps i-K+1 .. i). Nothing
  depends on T or on a later token; n is not used (the agent count grows with T: time O(T²·D / block_size)).
- noncausal_cross: agents pooled from the queries, as the paper; no DWC (v is not aligned with the queries).
- causal_cross: agents pooled from the keys (the context), so that no query influences another; no DWC.

Grid form (``spatial_shape=(h, w)``, noncausal_self and noncausal_cross; ``ops/grid_pool``), the paper's code:

    A = AdaptiveAvgPool2d((a_h, a_w))(Q on the h × w map),   DWC(V) = Conv2d(k × k, depthwise, zero 'same' padding)

- The agent grid: the squarest a_h × a_w with a_h·a_w = num_agents (the paper's √n × √n when n is a square:
  49 -> 7 × 7; 8 -> 2 × 4), its longer side along the map's longer side, each side clipped to the map's (a map
  side shorter than its agents: each row / column its own agent, as 1-D). Cells are torch's adaptive-pooling
  bands floor(i·h/a_h) .. ceil((i+1)·h/a_h) - 1, so they share a row (column) when a_h does not divide h.
- Key padding: an agent is the mean of the real queries of its cell (the cell stays where it is on the map);
  a cell with none drops out. The DWC sees padded positions as 0 (v is zeroed there), as the map's border.
- The 2-D DWC is its own parameter ``dwc2d [H, Dv, k, k]`` (k = ``kernel_size``, ≤ 63): a k × k kernel is not a
  reshape of the 1-D one's k taps; the paper's 3 × 3 is the default. noncausal_cross on a grid: no DWC.

The ``sdpa`` path runs each softmax as a fused SDPA call over the n agents (O(T·n·D), linear in T), the 1-D DWC
as one multiply-add per tap, the grid's agents as separable band sums (no [n, T] matrix) and its DWC as k²
multiply-adds on the grid. Causal_self runs blocked: every block of queries attends, in one batched SDPA call,
to the agents and its own keys. Decoding keeps a KV cache plus the past queries (``AgentCache``); a call
after the cache attends only from the blocks that hold its queries, but recomputes every agent's gather over
the cache (O(T²·D / block_size) per call). A state that also kept the completed agents' values would make a
step O(T·D / block_size); not done yet.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidOption, ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.gqa import repeat_kv
from ..ops.grid_pool import agent_grid, cell_pool_matrix, grid_cell_means
from ..ops.low_rank import never_empty, real_ranks, segment_matrix, segment_means
from ..ops.masking import masked_softmax
from ..ops.reference import compute_dtype, upcast_qkv
from ..ops.sdpa import sdpa
from ..options import check_int
from ..patterns import ALL_PATTERNS, Pattern
from ..state import KVCache
from ._agent_causal import blocked_causal_agents


@dataclass(frozen=True)
class AgentOptions:
    num_agents: int = 64  # n, agent tokens pooled from the queries (from the context in causal_cross)
    kernel_size: int = 3  # taps of the depthwise convolution on v (odd: centred in noncausal_self); k × k on a grid
    block_size: int = 64  # causal_self: real tokens per block; one agent per completed block

    def __post_init__(self):
        check_int("agent", "num_agents", self.num_agents)
        check_int("agent", "kernel_size", self.kernel_size, maximum=63)  # the grid's DWC holds k² taps per channel
        check_int("agent", "block_size", self.block_size)
        if self.kernel_size % 2 == 0:
            raise InvalidOption(f"agent option kernel_size={self.kernel_size} is not valid; expected an odd integer")


@dataclass(frozen=True)
class AgentCache(KVCache):
    """A KV cache that also keeps the past queries (causal agents are means of them)."""

    q: torch.Tensor | None = None  # [B, T, Hq, Dk]; None until the first call (q's heads are not known before)


@register_mechanism("agent")
class Agent(Mechanism):
    family = "low-rank"
    paper = Paper("Agent Attention: On the Integration of Softmax and Linear Attention", 2023, "2312.08874")
    patterns = ALL_PATTERNS
    grid_dims = (2,)  # spatial_shape=(h, w): pooled 2-D agents and a k × k DWC
    grid_patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.NONCAUSAL_CROSS})
    exact = False
    trainable = True
    state_kind = AgentCache
    complexity = Complexity(time="O(T·n·D) (causal_self: O(T²·D / block_size))", memory="O(T·(n + D))")
    Options = AgentOptions
    # 6 agents: a 2 × 3 agent grid (not square); 16: 4 × 4 cells that overlap on a (7, 9) map, clipped on (1, 7)
    example_options = ({"num_agents": 6, "block_size": 4}, {"num_agents": 16, "kernel_size": 5, "block_size": 16})
    fidelity_knob = ("num_agents", (16, 32, 64, 128))

    def __init__(self, heads: int | None = None, head_dim: int | None = None, **options):
        super().__init__(heads, head_dim, **options)
        kernel = self.options.kernel_size
        bound = 1.0 / math.sqrt(kernel)  # nn.Conv1d's default for a depthwise kernel (fan-in = kernel)
        self.dwc = nn.Parameter(torch.empty(heads, head_dim, kernel).uniform_(-bound, bound))  # [H, Dv, K]
        bound = 1.0 / kernel  # nn.Conv2d's default for a depthwise k × k kernel (fan-in = k²)
        self.dwc2d = nn.Parameter(torch.empty(heads, head_dim, kernel, kernel).uniform_(-bound, bound))  # [H, Dv, K, K]

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        if x.pattern.is_self and x.v.shape[-1] != self.head_dim:
            raise ShapeError(f"agent was created with head_dim={self.head_dim} for its DWC; v has {x.v.shape[-1]}")

    # ---- state ------------------------------------------------------------------------------------

    def empty_state(self, batch: int, kv_heads: int, dk: int, dv: int, *, device=None, dtype=torch.float32):
        base = KVCache.empty(batch, kv_heads, dk, dv, device=device, dtype=dtype)
        return AgentCache(offset=0, k=base.k, v=base.v)

    def join_cache(self, x: AttentionInputs):
        """Prepend the cached keys, values (and queries: ``x.state`` becomes the next cache, holding them all)."""
        if x.state is None and not x.want_state:
            return x, None
        cache = x.state or self.init_state(
            x.batch, x.kv_heads, x.k.shape[-1], x.v.shape[-1], device=x.k.device, dtype=x.k.dtype
        )
        k, v, mask, nxt = cache.extend(x.k, x.v, x.key_padding_mask)
        q_all = x.q if cache.q is None else torch.cat([cache.q.to(x.q.dtype), x.q], dim=1)
        nxt = dataclasses.replace(nxt, q=q_all)
        return x.replace(k=k, v=v, key_padding_mask=mask, q_offset=cache.length, state=nxt), nxt

    def state_bytes(self, shape: Shape, dtype: torch.dtype = torch.float32) -> int:
        elt = torch.empty(0, dtype=dtype).element_size()
        return shape.batch * shape.tk * (shape.kv_heads * (shape.dk + shape.dv) + shape.heads * shape.dk) * elt

    @staticmethod
    def _grid(x: AttentionInputs) -> tuple[int, int] | None:
        """The call's 2-D grid (the grid form), or None (the 1-D form: no spatial_shape, or a 1-D one)."""
        shape = x.spatial_shape
        return shape if shape is not None and len(shape) == 2 else None

    @staticmethod
    def _queries(x: AttentionInputs) -> torch.Tensor:
        """Every query of the sequence so far (the cached ones first): ``[B, Tk, Hq, Dk]`` in causal_self."""
        return x.state.q if isinstance(x.state, AgentCache) else x.q

    # ---- reference --------------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        if x.pattern is Pattern.CAUSAL_SELF:
            out = self._causal_reference(x)
        else:
            out = self._pooled_reference(x)
        return self._finish(x, out, self._dwc_reference(x)), None

    def _pooled_reference(self, x: AttentionInputs) -> torch.Tensor:
        q, k, v = upcast_qkv(x)  # [B, Tq, H, Dk], [B, Tk, H, Dk], [B, Tk, H, Dv]
        b, kpm = x.batch, x.key_padding_mask
        source, source_mask = self._agent_source(x, q, k)
        pool = self._pool_matrix(x, source_mask, source.shape[1], q.dtype)  # [B|1, n, T_src]
        agents = torch.einsum("bnt,bthd->bhnd", pool.expand(b, -1, -1), source)  # [B, H, n, Dk]
        valid = (pool.sum(-1) > 0)[:, None]  # [B|1, 1, n]
        real = torch.ones(1, 1, x.tk, dtype=torch.bool, device=q.device) if kpm is None else kpm[:, None]
        gather = masked_softmax(
            torch.einsum("bhnd,bkhd->bhnk", agents, k) * x.scale, valid[..., :, None] & real[..., None, :]
        )  # [B, H, n, Tk]
        agent_values = gather @ v.transpose(1, 2)  # [B, H, n, Dv]
        broadcast = masked_softmax(torch.einsum("bqhd,bhnd->bhqn", q, agents) * x.scale, valid[..., None, :])
        return torch.einsum("bhqn,bhnd->bqhd", broadcast, agent_values)  # [B, Tq, H, Dv]

    def _pool_matrix(self, x: AttentionInputs, mask: torch.Tensor | None, t: int, dtype) -> torch.Tensor:
        """The agents' averaging matrix ``[B|1, n, T]``: 2-D adaptive-pooling cells of the grid, or 1-D segments."""
        n, grid = self.options.num_agents, self._grid(x)
        if grid is None:
            return segment_matrix(mask, x.batch, t, n, x.q.device, dtype)
        return cell_pool_matrix(mask, grid, agent_grid(n, grid), x.q.device, dtype)

    def _agent_source(self, x: AttentionInputs, q: torch.Tensor, k: torch.Tensor):
        """What the agents are pooled from, and which of its tokens count: q (self: its real tokens), or the
        context's keys in causal_cross."""
        if x.pattern is Pattern.CAUSAL_CROSS:
            return k, x.key_padding_mask
        return q, x.key_padding_mask if x.pattern.is_self else None

    def _causal_reference(self, x: AttentionInputs) -> torch.Tensor:
        _, k, v = upcast_qkv(x)  # [B, T, H, Dk], [B, T, H, Dv] (T: every token so far)
        q = self._queries(x).to(k.dtype)  # [B, T, H, Dk]
        b, t, bs, kpm = x.batch, x.tk, self.options.block_size, x.key_padding_mask
        rank, _ = real_ranks(kpm, b, t, k.device)  # [B|1, T]: real tokens before each position
        real = torch.ones(1, t, dtype=torch.bool, device=k.device) if kpm is None else kpm
        block = torch.div(rank, bs, rounding_mode="floor")  # [B|1, T]: a token's block (a query's, if padded)
        blocks = -(-t // bs)
        member = (block[:, None, :] == torch.arange(blocks, device=k.device)[None, :, None]) & real[:, None]
        pool = member.to(k.dtype) / member.sum(-1, keepdim=True).clamp(min=1)  # [B|1, nb, T]
        agents = torch.einsum("bct,bthd->bhcd", pool.expand(b, -1, -1), q)  # [B, H, nb, Dk]

        # agent c gathers from the real keys of blocks <= c
        up_to = (block[:, None, :] <= torch.arange(blocks, device=k.device)[None, :, None]) & real[:, None]
        gather = masked_softmax(torch.einsum("bhcd,bkhd->bhck", agents, k) * x.scale, up_to[:, None])
        agent_values = gather @ v.transpose(1, 2)  # [B, H, nb, Dv]

        # query i: agents of completed blocks c < c_i, and the real keys of its block up to itself
        pos = torch.arange(t, device=k.device)
        sees_agent = torch.arange(blocks, device=k.device)[None, None, :] < block[:, :, None]  # [B|1, T, nb]
        local = (block[:, :, None] == block[:, None, :]) & real[:, None, :] & (pos[None, None, :] <= pos[None, :, None])
        scores = torch.cat(
            [torch.einsum("bqhd,bhcd->bhqc", q, agents), torch.einsum("bqhd,bkhd->bhqk", q, k)], dim=-1
        )  # [B, H, T, nb + T]
        probs = masked_softmax(scores * x.scale, torch.cat([sees_agent, local], dim=-1)[:, None])
        out = probs[..., :blocks] @ agent_values + probs[..., blocks:] @ v.transpose(1, 2)  # [B, H, T, Dv]
        return out.transpose(1, 2)[:, x.q_offset :]  # [B, Tq, H, Dv]: the rows of this call's queries

    def _dwc_reference(self, x: AttentionInputs) -> torch.Tensor | None:
        """sum_j w[h, d, j] v[t + j - centre] (zero outside the sequence), for this call's queries."""
        if not x.pattern.is_self:
            return None
        _, _, v = upcast_qkv(x)  # [B, T, H, Dv]
        grid = self._grid(x)
        if grid is None:
            return depthwise_taps(v, self.dwc.to(v.dtype), self._dwc_left(x), x.q_offset)
        # the paper's nn.Conv2d(C, C, k, padding=k // 2, groups=C, bias=False) over v's channels on the map
        b, t, h, d = v.shape
        kernel = self.options.kernel_size
        image = v.reshape(b, *grid, h * d).permute(0, 3, 1, 2)  # [B, H*Dv, h, w]
        weight = self.dwc2d.to(v.dtype).reshape(h * d, 1, kernel, kernel)
        out = F.conv2d(image, weight, padding=kernel // 2, groups=h * d)  # [B, H*Dv, h, w]
        return out.permute(0, 2, 3, 1).reshape(b, t, h, d)

    def _dwc_left(self, x: AttentionInputs) -> int:
        """Taps before the token (the rest are after it): all but one in causal_self, half otherwise."""
        kernel = self.options.kernel_size
        return kernel - 1 if x.pattern is Pattern.CAUSAL_SELF else kernel // 2

    def _finish(self, x: AttentionInputs, out: torch.Tensor, dwc: torch.Tensor | None) -> torch.Tensor:
        """Add the DWC term; zero the outputs of padded positions (self patterns); cast to q's dtype."""
        if dwc is not None:
            out = dwc.add_(out)  # dwc is this call's own tensor: no third [T, H, Dv] one
        if x.pattern.is_self and x.key_padding_mask is not None:
            real = x.key_padding_mask[:, x.q_offset :, None, None]  # [B, Tq, 1, 1]
            out = torch.where(real, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out.to(x.q.dtype)

    # ---- fast path --------------------------------------------------------------------------------

    @fast_path("sdpa")
    def sdpa(self, x: AttentionInputs):
        if x.pattern is Pattern.CAUSAL_SELF:
            cdt = compute_dtype(x.q.dtype)
            q_all = self._queries(x).to(cdt)
            k, v, bs = x.k.to(cdt), x.v.to(cdt), self.options.block_size
            out = blocked_causal_agents(q_all, k, v, x.key_padding_mask, bs, x.scale, x.q_offset)
        else:
            out = self._pooled(x)
        return self._finish(x, out, self._dwc(x)), None

    def _pooled(self, x: AttentionInputs) -> torch.Tensor:
        cdt = compute_dtype(x.q.dtype)
        q, k, v = (t.to(cdt) for t in (x.q, x.k, x.v))
        kpm, zero = x.key_padding_mask, torch.zeros((), dtype=cdt, device=q.device)
        source, source_mask = self._agent_source(x, q, k)
        agents, valid = self._agents(x, source, source_mask)  # [B, n, H', Dk], [B|1, n]
        agents = repeat_kv(agents, x.heads // agents.shape[2])  # [B, n, Hq, Dk]
        key_mask = None if kpm is None else never_empty(kpm)[:, None, None, :]  # [B, 1, 1, Tk]
        agent_values = sdpa(agents, k, v, scale=x.scale, mask=key_mask)  # [B, n, Hq, Dv]
        live = valid if kpm is None else valid & kpm.any(-1, keepdim=True)  # no real key: V_A = 0
        agent_values = torch.where(live[:, :, None, None], agent_values, zero)
        out = sdpa(q, agents, agent_values, scale=x.scale, mask=never_empty(valid)[:, None, None, :])
        if kpm is None:  # every call has a token, so an agent: nothing to clear
            return out  # [B, Tq, Hq, Dv]
        return torch.where(valid.any(-1)[:, None, None, None], out, zero)  # no real token: no agent: 0

    def _agents(self, x: AttentionInputs, source: torch.Tensor, mask: torch.Tensor | None):
        """Pooled agents ``[B, n, H', Dk]`` and which hold a real token ``[B|1, n]``: grid cells or 1-D segments."""
        n, grid = self.options.num_agents, self._grid(x)
        if grid is None:
            return segment_means(source, mask, n)
        return grid_cell_means(source, mask, grid, agent_grid(n, grid))

    def _dwc(self, x: AttentionInputs) -> torch.Tensor | None:
        """The depthwise convolution in the [B, T, H, Dv] layout: one multiply-add per tap, no transposed copies
        (measured: a grouped conv1d over [B, H*Dv, T] spends more in the two layout copies than in the taps)."""
        if not x.pattern.is_self:
            return None
        v = repeat_kv(x.v, x.groups).to(compute_dtype(x.q.dtype))  # [B, T, Hq, Dv]
        grid = self._grid(x)
        if grid is None:
            return depthwise_taps(v, self.dwc.to(v.dtype), self._dwc_left(x), x.q_offset)
        b, t, h, d = v.shape
        return depthwise_taps_2d(v.view(b, *grid, h, d), self.dwc2d.to(v.dtype)).view(b, t, h, d)

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        d = shape.dk + shape.dv
        kernel = self.options.kernel_size
        grid = shape.grid if shape.grid is not None and len(shape.grid) == 2 else None
        taps = kernel if grid is None else kernel * kernel
        dwc = shape.tq * shape.dv * taps if pattern.is_self else 0
        if grid is not None:  # the agents the call's map holds (fewer than num_agents on a small map)
            n = math.prod(agent_grid(self.options.num_agents, grid))
            gather, broadcast, pool = n * shape.tk * d, shape.tq * n * d, shape.tq * shape.dk / 2
        elif pattern is Pattern.CAUSAL_SELF:
            bs = self.options.block_size
            blocks = -(-shape.tk // bs)
            gather = blocks * shape.tk / 2 * d  # agent c reads the keys up to its block's end
            broadcast = shape.tq * (blocks / 2 + bs / 2) * d  # past agents and the own block
            pool = shape.tk * shape.dk / 2
        else:
            n = self.options.num_agents
            gather, broadcast, pool = n * shape.tk * d, shape.tq * n * d, shape.tq * shape.dk / 2
        return 2.0 * shape.batch * shape.heads * (gather + broadcast + pool + dwc)


def depthwise_taps(v: torch.Tensor, w: torch.Tensor, left: int, start: int = 0) -> torch.Tensor:
    """Depthwise convolution over the tokens: ``out[t] = sum_j w[:, :, j] * v[t + j - left]`` (zero outside
    ``v``), for ``t >= start``. ``v [B, T, H, D]``, ``w [H, D, K]`` -> ``[B, T - start, H, D]``."""
    t, kernel = v.shape[1], w.shape[-1]
    out = v.new_zeros(v.shape[0], t - start, *v.shape[2:])
    for j in range(kernel):
        shift = j - left  # tap j reads v[t + shift]
        lo, hi = max(start, -shift), min(t, t - shift)  # the outputs whose tap lies inside v
        if lo < hi:
            out[:, lo - start : hi - start].addcmul_(v[:, lo + shift : hi + shift], w[:, :, j])  # no temporary
    return out


def depthwise_taps_2d(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Depthwise k × k convolution over a grid, zero outside it (``Conv2d(padding=k // 2, groups=C)``):
    ``out[y, x] = sum_ij w[:, :, i, j] * v[y + i - k//2, x + j - k//2]``. ``v [B, h, w, H, D]``, ``w [H, D, k, k]``
    -> ``[B, h, w, H, D]``: one multiply-add per tap in the token layout, no transposed copies."""
    rows, cols, kernel = v.shape[1], v.shape[2], w.shape[-1]
    out = torch.zeros_like(v)
    for i in range(kernel):
        di = i - kernel // 2  # tap row i reads v[y + di]
        r0, r1 = max(0, -di), min(rows, rows - di)
        for j in range(kernel):
            dj = j - kernel // 2
            c0, c1 = max(0, -dj), min(cols, cols - dj)
            if r0 < r1 and c0 < c1:
                out[:, r0:r1, c0:c1].addcmul_(v[:, r0 + di : r1 + di, c0 + dj : c1 + dj], w[:, :, i, j])
    return out
