"""agent: the paper's formula written out (pooling, gather, broadcast, DWC as a conv1d), the leak-free causal
definition (block structure, future tokens change nothing, a big block is causal softmax), causal_cross's
agents from the context, decoding state, option checks, and linear memory of the fast path. The grid form
(spatial_shape=(h, w)): a per-query loop in fp64 with torch's adaptive 2-D pooling for the agents and the k × k
DWC tap by tap, key padding as masked cell means, the agent grid's shape, the DWC at the map's border, refusals,
flops on the call's grid, and its memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from largest_tensor import largest_tensor

import attnkit
from attnkit.errors import InvalidOption, ShapeError, UnsupportedPattern
from attnkit.mechanism import Shape
from attnkit.mechanisms.agent import depthwise_taps_2d
from attnkit.ops.grid_pool import agent_grid
from attnkit.testing import assert_close, make_qkv


def pooled(x, n):
    """Adaptive average pooling over tokens by hand: segment s holds ranks r with floor(r n / T) == s."""
    t = x.shape[1]
    groups = [[r for r in range(t) if r * n // t == s] for s in range(n)]
    return torch.stack([x[:, g].mean(1) for g in groups if g], dim=1)  # [B, n', H, D]


def conv_dwc(v, w, causal):
    """The DWC with torch's conv1d: v [B, T, H, D], w [H, D, K]."""
    b, t, h, d = v.shape
    kern = w.shape[-1]
    pad = (kern - 1, 0) if causal else (kern // 2, kern // 2)
    x = F.pad(v.reshape(b, t, h * d).transpose(1, 2), pad)
    return F.conv1d(x, w.reshape(h * d, 1, kern), groups=h * d).transpose(1, 2).reshape(b, t, h, d)


def literal_noncausal(q, k, v, n, w, scale):
    a = pooled(q, n)  # [B, n, H, D]
    va = torch.softmax(scale * torch.einsum("bnhd,bkhd->bhnk", a, k), -1) @ v.transpose(1, 2)  # [B, H, n, D]
    out = torch.softmax(scale * torch.einsum("bqhd,bnhd->bhqn", q, a), -1) @ va
    return out.transpose(1, 2) + conv_dwc(v, w, causal=False)


@pytest.mark.parametrize("path", ["reference", "sdpa"])
@pytest.mark.parametrize("n", [4, 7, 25])  # divides T, ragged, more agents than tokens
def test_noncausal_self_is_the_papers_formula(path, n):
    mech = attnkit.create("agent", heads=2, head_dim=8, num_agents=n, kernel_size=5).double()
    q, k, v = make_qkv(2, 20, 20, 2, 2, 8, dtype=torch.float64)
    want = literal_noncausal(q, k, v, n, mech.dwc.detach(), 8**-0.5)
    assert_close(path, want, mech(q, k, v, pattern="noncausal_self", path=path), 1e-9)


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_causal_with_one_block_is_causal_softmax_plus_a_causal_conv(path):
    # block_size >= T: no block completes, so no agent: exact causal attention over the own block
    mech = attnkit.create("agent", heads=2, head_dim=8, block_size=64, kernel_size=3).double()
    q, k, v = make_qkv(1, 30, 30, 2, 2, 8, dtype=torch.float64)
    want = attnkit.attend(q, k, v, "softmax", pattern="causal_self") + conv_dwc(v, mech.dwc.detach(), causal=True)
    assert_close(path, want, mech(q, k, v, pattern="causal_self", path=path), 1e-9)


def causal_literal(q, k, v, bs, scale):
    """Query i: one softmax over the agents of completed blocks c < i // bs (agent c: mean of q over block c,
    gathering from keys <= its block's end) and the keys of its own block up to i. A loop per query."""
    b, t, h, d = q.shape
    out = torch.zeros_like(v)
    for i in range(t):
        c_i = i // bs
        keys, vals = [], []
        for c in range(c_i):
            a = q[:, c * bs : (c + 1) * bs].mean(1)  # [B, H, D]
            kk, vv = k[:, : (c + 1) * bs], v[:, : (c + 1) * bs]
            p = torch.softmax(scale * torch.einsum("bhd,bkhd->bhk", a, kk), -1)
            keys.append(a)
            vals.append(torch.einsum("bhk,bkhd->bhd", p, vv))
        for j in range(c_i * bs, i + 1):
            keys.append(k[:, j])
            vals.append(v[:, j])
        kk, vv = torch.stack(keys, 1), torch.stack(vals, 1)  # [B, n, H, D]
        p = torch.softmax(scale * torch.einsum("bhd,bnhd->bhn", q[:, i], kk), -1)
        out[:, i] = torch.einsum("bhn,bnhd->bhd", p, vv)
    return out


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_causal_self_equals_the_loop_over_queries(path):
    mech = attnkit.create("agent", heads=2, head_dim=8, block_size=4).double()
    with torch.no_grad():
        mech.dwc.zero_()
    q, k, v = make_qkv(2, 19, 19, 2, 2, 8, dtype=torch.float64)
    assert_close(path, causal_literal(q, k, v, 4, 8**-0.5), mech(q, k, v, pattern="causal_self", path=path), 1e-9)


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_future_tokens_change_no_causal_output(path):
    # agents are means of *queries*: changing only later queries must not move earlier outputs either
    mech = attnkit.create("agent", heads=2, head_dim=8, block_size=4, kernel_size=5)
    q, k, v = make_qkv(2, 40, 40, 2, 2, 8)
    out = mech(q, k, v, pattern="causal_self", path=path)
    for cut in (1, 4, 13, 21):
        for which in ("q", "k", "v", "all"):
            q2, k2, v2 = q.clone(), k.clone(), v.clone()
            for name, t in (("q", q2), ("k", k2), ("v", v2)):
                if which in (name, "all"):
                    t[:, cut:] = torch.randn_like(t[:, cut:]) * 3
            moved = mech(q2, k2, v2, pattern="causal_self", path=path)
            assert torch.equal(out[:, :cut], moved[:, :cut]) or torch.allclose(out[:, :cut], moved[:, :cut],
                                                                                 atol=1e-6), (cut, which)  # fmt: skip


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_causal_cross_agents_come_from_the_context(path):
    mech = attnkit.create("agent", heads=2, head_dim=8, num_agents=4)
    q, k, v = make_qkv(1, 9, 12, 2, 2, 8)
    out = mech(q, k, v, pattern="causal_cross", path=path)
    q2 = q.clone()
    q2[:, 1:] = torch.randn_like(q2[:, 1:])  # other queries change: query 0's output does not
    assert torch.allclose(out[:, 0], mech(q2, k, v, pattern="causal_cross", path=path)[:, 0], atol=1e-6)
    a = pooled(k, 4)  # agents: pooled keys
    va = torch.softmax(8**-0.5 * torch.einsum("bnhd,bkhd->bhnk", a, k), -1) @ v.transpose(1, 2)
    want = (torch.softmax(8**-0.5 * torch.einsum("bqhd,bnhd->bhqn", q, a), -1) @ va).transpose(1, 2)
    assert_close("formula", want, out, 2e-5)


def test_padded_positions_give_zero_and_padding_is_as_if_removed():
    mech = attnkit.create("agent", heads=2, head_dim=8, num_agents=4, block_size=3, kernel_size=1)
    q, k, v = make_qkv(1, 20, 20, 2, 2, 8)
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[0, 5:9] = False
    for pattern in ("noncausal_self", "causal_self"):
        for path in ("reference", "sdpa"):
            out = mech(q, k, v, pattern=pattern, key_padding_mask=mask, path=path)
            assert out[:, ~mask[0]].abs().max() == 0
            keep = mask[0]  # kernel 1: the DWC has no neighbours, so removing tokens is the same sequence
            want = mech(q[:, keep], k[:, keep], v[:, keep], pattern=pattern, path=path)
            assert_close(f"{pattern} {path}", want, out[:, keep], 2e-5)


def test_decoding_step_by_step_equals_one_call():
    mech = attnkit.create("agent", heads=4, head_dim=8, block_size=3)
    q, k, v = make_qkv(1, 11, 11, 4, 2, 8)
    full = mech(q, k, v, pattern="causal_self")
    state, outs = None, []
    for i in range(11):
        o, state = mech(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], pattern="causal_self", state=state,
                        return_state=True)  # fmt: skip
        outs.append(o)
    assert_close("steps", full, torch.cat(outs, 1), 2e-5)
    assert state.q.shape == (1, 11, 4, 8) and state.k.shape == (1, 11, 2, 8)


@pytest.mark.parametrize(
    ("option", "value"),
    [("num_agents", 0), ("num_agents", 2**70), ("kernel_size", 4), ("kernel_size", 0), ("block_size", -2),
     ("block_size", 2**70), ("num_agents", "8"), ("kernel_size", 65)],
)  # fmt: skip
def test_options_are_checked(option, value):
    with pytest.raises(InvalidOption, match=option):
        attnkit.create("agent", heads=2, head_dim=8, **{option: value})


def test_dwc_is_trained():
    mech = attnkit.create("agent", heads=2, head_dim=8)
    q, k, v = make_qkv(1, 10, 10, 2, 2, 8)
    mech(q, k, v, pattern="noncausal_self").sum().backward()
    assert mech.dwc.grad.abs().sum() > 0


def test_fast_path_memory_is_linear_in_noncausal_and_blocked_in_causal():
    t, h, d = 1024, 2, 16
    q, k, v = make_qkv(1, t, t, h, h, d)
    mech = attnkit.create("agent", heads=h, head_dim=d, num_agents=16, block_size=64)
    numel, shape = largest_tensor(lambda: mech(q, k, v, pattern="noncausal_self", path="sdpa"))
    assert numel <= t * h * d, shape  # q's size: no [T, T] and no [T, n] kept
    numel, shape = largest_tensor(lambda: mech(q, k, v, pattern="causal_self", path="sdpa"))
    blocks = t // 64
    # at most each query's scores over the agents and its own block: T (T / bs + bs), never [T, T]
    assert numel <= t * (blocks + 64) * h < t * t * h, shape


# ---- the grid form -------------------------------------------------------------------------------------------


def grid_agents(q, grid, cells, mask=None):
    """The paper's agents: AdaptiveAvgPool2d(cells) of q on the map. With a mask, a masked mean per cell, as
    pool(m * q) / pool(m) (one cell, one size). Returns agents [B, n, H, D] and which exist [B, n]."""
    b, t, h, d = q.shape
    m = torch.ones(b, t, dtype=q.dtype) if mask is None else mask.to(q.dtype)
    image = (q * m[:, :, None, None]).reshape(b, *grid, h * d).permute(0, 3, 1, 2)  # [B, H*D, h, w]
    sums = F.adaptive_avg_pool2d(image, cells).flatten(2).transpose(1, 2).reshape(b, -1, h, d)
    counts = F.adaptive_avg_pool2d(m.reshape(b, 1, *grid), cells).flatten(1)  # [B, n]
    return sums / counts.clamp(min=1e-300)[:, :, None, None], counts > 0


def literal_grid(q, k, v, grid, cells, scale, w2d=None, mask=None, cross=False):
    """One query at a time (fp64): a softmax over the existing agents, each agent's values a softmax over the
    real keys (none: 0), plus (self) the k × k DWC summed tap by tap, zero outside the map."""
    b, t, h, d = q.shape
    agents, exists = grid_agents(q, grid, cells, None if cross else mask)
    real = torch.ones(b, k.shape[1], dtype=torch.bool) if mask is None else mask
    values = torch.zeros(b, agents.shape[1], h, v.shape[-1], dtype=q.dtype)
    for a in range(agents.shape[1]):
        s = scale * torch.einsum("bhd,bkhd->bhk", agents[:, a], k).masked_fill(~real[:, None], float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1))  # no real key: 0
        values[:, a] = torch.einsum("bhk,bkhd->bhd", p, v)
    out = torch.zeros(b, t, h, v.shape[-1], dtype=q.dtype)
    for i in range(t):
        s = scale * torch.einsum("bhd,bnhd->bhn", q[:, i], agents).masked_fill(~exists[:, None], float("-inf"))
        out[:, i] = torch.einsum("bhn,bnhd->bhd", torch.softmax(s, -1), values)
        if w2d is not None:
            y, x, kern = i // grid[1], i % grid[1], w2d.shape[-1]
            for a in range(kern):
                for c in range(kern):
                    yy, xx = y + a - kern // 2, x + c - kern // 2
                    if 0 <= yy < grid[0] and 0 <= xx < grid[1]:
                        out[:, i] += w2d[:, :, a, c] * v[:, yy * grid[1] + xx]
    if mask is not None and not cross:
        out = out * mask[:, :, None, None]  # a padded position is no token
    return out


GRID_CASES = [  # (map, num_agents, kernel_size, the agent grid)
    ((7, 9), 6, 3, (2, 3)),  # overlapping bands: rows 0-3 / 3-6, columns 0-2 / 3-5 / 6-8
    ((9, 7), 6, 3, (3, 2)),  # the agent grid's longer side follows the map's
    ((7, 9), 16, 5, (4, 4)),
    ((2, 9), 16, 3, (2, 4)),  # the map has 2 rows: each row its own agent row
    ((3, 3), 49, 3, (3, 3)),  # more agents than tokens: each token its own agent
    ((14, 14), 49, 3, (7, 7)),  # the paper's agent_num=49 -> AdaptiveAvgPool2d((7, 7))
    ((5, 6), 7, 1, (1, 6)),  # a prime count: 1 x 7 column bands, clipped to the map's 6 columns
]


@pytest.mark.parametrize("path", ["reference", "sdpa"])
@pytest.mark.parametrize(("grid", "n", "kernel", "cells"), GRID_CASES, ids=lambda c: str(c))
def test_grid_form_is_the_papers_pooling_and_conv2d(path, grid, n, kernel, cells):
    assert agent_grid(n, grid) == cells
    mech = attnkit.create("agent", heads=2, head_dim=8, num_agents=n, kernel_size=kernel).double()
    t = grid[0] * grid[1]
    q, k, v = make_qkv(2, t, t, 2, 2, 8, dtype=torch.float64)
    want = literal_grid(q, k, v, grid, cells, 8**-0.5, mech.dwc2d.detach())
    assert_close(path, want, mech(q, k, v, pattern="noncausal_self", spatial_shape=grid, path=path), 1e-9)


def test_agent_grid_shapes():
    assert agent_grid(8, (7, 9)) == (2, 4) and agent_grid(8, (9, 7)) == (4, 2) and agent_grid(8, (5, 5)) == (2, 4)
    assert agent_grid(16, (1, 7)) == (1, 4) and agent_grid(64, (3, 100)) == (3, 8) and agent_grid(1, (9, 9)) == (1, 1)


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_grid_key_padding_is_a_masked_mean_per_cell_and_empty_cells_drop_out(path):
    mech = attnkit.create("agent", heads=2, head_dim=8, num_agents=6).double()
    q, k, v = make_qkv(2, 63, 63, 2, 1, 8, dtype=torch.float64)  # GQA 2:1
    mask = torch.rand(2, 63, generator=torch.Generator().manual_seed(1)) > 0.3
    cell = torch.zeros(7, 9, dtype=torch.bool)
    cell[:4, :3] = True  # agent (0, 0)'s whole cell (rows 0-3, columns 0-2) is padding in row 0
    mask[0] &= ~cell.flatten()
    out = mech(q, k, v, pattern="noncausal_self", spatial_shape=(7, 9), key_padding_mask=mask, path=path)
    kk, vv = k.repeat_interleave(2, 2) * mask[:, :, None, None], v.repeat_interleave(2, 2) * mask[:, :, None, None]
    want = literal_grid(q, kk, vv, (7, 9), (2, 3), 8**-0.5, mech.dwc2d.detach(), mask)
    assert_close(path, want, out, 1e-9)
    assert out[~mask].abs().max() == 0
    q2 = q.clone()
    q2[~mask] = torch.randn_like(q2[~mask]) * 100  # padded queries are in no agent
    moved = mech(q2, k, v, pattern="noncausal_self", spatial_shape=(7, 9), key_padding_mask=mask, path=path)
    assert_close("padded queries", out[mask], moved[mask], 1e-12)


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_grid_cross_pools_the_queries_map_and_has_no_dwc(path):
    mech = attnkit.create("agent", heads=2, head_dim=8, num_agents=4).double()
    q, k, v = make_qkv(2, 35, 12, 2, 2, 8, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 3:8] = False
    out = mech(q, k, v, pattern="noncausal_cross", spatial_shape=(5, 7), key_padding_mask=mask, path=path)
    want = literal_grid(q, k * mask[:, :, None, None], v * mask[:, :, None, None], (5, 7), (2, 2), 8**-0.5,
                        mask=mask, cross=True)  # fmt: skip
    assert_close(path, want, out, 1e-9)


def test_grid_dwc_at_the_border_sees_zeros_beyond_the_map():
    # one-hot v at the corner (0, 0) of a 7 x 9 map: only the outputs whose 5 x 5 window holds it, from a clipped kernel
    kern, c = 5, 2
    w = torch.randn(2, 3, kern, kern, dtype=torch.float64)
    v = torch.zeros(1, 7, 9, 2, 3, dtype=torch.float64)
    v[0, 0, 0] = 1.0
    out = depthwise_taps_2d(v, w)
    want = torch.zeros_like(out)
    for y in range(c + 1):
        for x in range(c + 1):
            want[0, y, x] = w[:, :, c - y, c - x]  # out[y, x] = sum_ij w[i, j] v[y + i - c, x + j - c]
    assert torch.equal(out, want)
    full = depthwise_taps_2d(torch.randn(2, 7, 9, 2, 3, dtype=torch.float64), w)
    assert full.shape == (2, 7, 9, 2, 3)


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_a_one_d_spatial_shape_is_the_sequence_form_and_a_grid_is_not(path):
    mech = attnkit.create("agent", heads=2, head_dim=8, num_agents=6)
    q, k, v = make_qkv(1, 63, 63, 2, 2, 8)
    seq = mech(q, k, v, pattern="noncausal_self", path=path)
    assert torch.equal(seq, mech(q, k, v, pattern="noncausal_self", spatial_shape=(63,), path=path))
    assert not torch.allclose(seq, mech(q, k, v, pattern="noncausal_self", spatial_shape=(7, 9), path=path))


def test_the_grid_form_refuses_causal_patterns_and_other_ranks():
    mech = attnkit.create("agent", heads=2, head_dim=8)
    q, k, v = make_qkv(1, 12, 12, 2, 2, 8)
    for pattern in ("causal_self", "causal_cross"):
        with pytest.raises(UnsupportedPattern, match=pattern):
            mech(q, k, v, pattern=pattern, spatial_shape=(3, 4))
    with pytest.raises(ShapeError, match="2-D"):
        mech(q, k, v, pattern="noncausal_self", spatial_shape=(2, 2, 3))


def test_each_form_trains_its_own_dwc():
    mech = attnkit.create("agent", heads=2, head_dim=8)
    q, k, v = make_qkv(1, 12, 12, 2, 2, 8)
    mech(q, k, v, pattern="noncausal_self", spatial_shape=(3, 4)).sum().backward()
    assert mech.dwc2d.grad.abs().sum() > 0 and mech.dwc.grad is None
    assert mech.dwc2d.shape == (2, 8, 3, 3)


def test_a_vit_runs_agent_on_its_patch_grid():
    model = attnkit.nn.ViT(12, 3, 1, 4, dim=16, depth=1, heads=2, mechanism="agent", pooling="mean", num_agents=4)
    model(torch.randn(2, 1, 12, 12)).sum().backward()
    mech = model.blocks[0].attn.mechanism
    assert mech.dwc2d.grad.abs().sum() > 0 and mech.dwc.grad is None  # the grid form ran


def test_flops_count_on_the_calls_grid():
    mech = attnkit.create("agent", heads=2, head_dim=8, num_agents=16, kernel_size=3)
    nc = attnkit.Pattern.NONCAUSAL_SELF
    seq = mech.flops(Shape(1, 63, 63, 2, 2, 8, 8), nc)
    grid = mech.flops(Shape(1, 63, 63, 2, 2, 8, 8, grid=(7, 9)), nc)
    assert grid - seq == 2.0 * 2 * 63 * 8 * (9 - 3)  # the DWC: k² taps on a grid, k in a sequence (16 agents both)
    # a (1, 63) map holds 1 x 4 agents, not 16
    assert mech.flops(Shape(1, 63, 63, 2, 2, 8, 8, grid=(1, 63)), nc) < seq


def test_grid_fast_path_memory_is_linear():
    t, h, d = 1024, 2, 16
    q, k, v = make_qkv(1, t, t, h, h, d)
    mech = attnkit.create("agent", heads=h, head_dim=d, num_agents=16)
    kpm = torch.rand(1, t, generator=torch.Generator().manual_seed(0)) > 0.2
    for mask in (None, kpm):
        kw = {"pattern": "noncausal_self", "spatial_shape": (32, 32), "path": "sdpa", "key_padding_mask": mask}
        numel, shape = largest_tensor(lambda kw=kw: mech(q, k, v, **kw))
        assert numel <= t * h * d, shape  # q's size: no [T, n] pooling matrix, no [T, T]
