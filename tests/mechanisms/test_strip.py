"""strip, both forms. ssa (S2AFormer's strip self-attention): a literal per-query loop over the reduced cells,
the identity case that is softmax, borders of non-dividing grids, padding, parameters, refusals, flops, the picture
and the fast path's memory. strips: the union of a query's row strip and column strip against a literal loop,
borders, padding, refusals and the fast path's memory."""

from __future__ import annotations

import math

import pytest
import torch
from largest_tensor import largest_tensor

import attnkit
from attnkit import viz
from attnkit.errors import AttnkitError, InvalidOption, ShapeError, UnsupportedPattern
from attnkit.patterns import Pattern
from attnkit.testing import assert_close, make_qkv

PATHS = ("reference", "strips")
SSA_PATHS = ("reference", "sdpa")


def strips(strip: int, heads: int):
    """The strips form (parameter-free, but strip is trainable as a mechanism: heads= and head_dim= are needed)."""
    return attnkit.create("strip", heads=heads, head_dim=8, form="strips", strip=strip)


def strips_attend(q, k, v, *, strip, path, **call):
    return strips(strip, q.shape[2])(q, k, v, pattern="noncausal_self", path=path, **call)


def fp64_per_query_head(q, k, v, real):
    """q, k, v in fp64 with k, v repeated to the query heads, and the real-key mask (all real when None)."""
    g = q.shape[2] // k.shape[2]
    real = torch.ones(q.shape[:2], dtype=torch.bool) if real is None else real
    return q.double(), k.double().repeat_interleave(g, 2), v.double().repeat_interleave(g, 2), real


def literal(q, k, v, shape, strip, real=None):
    """Per query (r, c) and head: softmax over the real keys (r', c') with r' // s == r // s or c' // s == c // s,
    each key once; fp64, k and v repeated to the query heads; a query that sees no key outputs 0."""
    b, t, hq, d = q.shape
    q, k, v, real = fp64_per_query_head(q, k, v, real)
    h, w = shape
    out = torch.zeros(b, t, hq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for r in range(h):
            for c in range(w):
                keys = [
                    r2 * w + c2
                    for r2 in range(h)
                    for c2 in range(w)
                    if (r2 // strip == r // strip or c2 // strip == c // strip) and real[bi, r2 * w + c2]
                ]
                if not keys:
                    continue
                i = r * w + c
                for head in range(hq):
                    s = torch.stack([q[bi, i, head] @ k[bi, j, head] for j in keys]) / math.sqrt(d)
                    out[bi, i, head] = s.softmax(0) @ v[bi, keys, head]
    return out


@pytest.mark.parametrize("shape, strip, heads, kv_heads", [((5, 7), 2, 4, 2), ((4, 6), 3, 3, 1), ((3, 8), 1, 2, 2)])
def test_paths_follow_the_literal_loop(shape, strip, heads, kv_heads):
    """Non-dividing grids (5 rows and 7 columns in strips of 2, 4 rows in strips of 3), GQA, key padding."""
    t = shape[0] * shape[1]
    q, k, v = make_qkv(2, t, t, heads, kv_heads, 4, dtype=torch.float64)
    real = torch.rand(2, t, generator=torch.Generator().manual_seed(3)) > 0.4
    real[1, :] = False
    real[1, 0] = True  # batch row 1: one real key, so most queries' crosses hold none and output 0
    mech = strips(strip, heads)
    for mask in (None, real):
        expected = literal(q, k, v, shape, strip, mask)
        for path in PATHS:
            out = mech(q, k, v, pattern="noncausal_self", spatial_shape=shape, key_padding_mask=mask, path=path)
            assert_close(f"{path} mask={mask is not None}", expected, out, 1e-10)


@pytest.mark.parametrize("path", PATHS)
def test_strips_covering_the_grid_are_softmax(path):
    q, k, v = make_qkv(2, 35, 35, 4, 2, 8)
    soft = attnkit.attend(q, k, v, pattern="noncausal_self")
    for strip in (5, 7, 9):  # a row strip of 5 rows already covers a 5 x 7 grid
        out = strips_attend(q, k, v, spatial_shape=(5, 7), strip=strip, path=path)
        assert_close(f"{path} strip={strip}", soft, out, 1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_border_query_of_a_non_dividing_grid_sees_its_thinner_strips(path):
    """5 x 7 grid in strips of 2: query (4, 6) has row strip {row 4} and column strip {column 6}; the literal key
    set (11 keys, (4, 6) once) attended with plain softmax."""
    h, w = 5, 7
    q, k, v = make_qkv(1, h * w, h * w, 2, 2, 8)
    out = strips_attend(q, k, v, spatial_shape=(h, w), strip=2, path=path)
    keys = sorted({4 * w + c for c in range(w)} | {r * w + 6 for r in range(h)})
    assert len(keys) == 11
    i = 4 * w + 6
    expected = attnkit.attend(q[:, [i]], k[:, keys], v[:, keys], pattern="noncausal_cross")
    assert_close("border", expected[:, 0], out[:, i], 1e-5)


def test_every_head_sees_the_whole_cross_unlike_cswin():
    """strip=1: moving a key in the query's column changes every head of that query, moving one outside its
    row and column changes none."""
    h, w = 4, 5
    q, k, v = make_qkv(1, h * w, h * w, 3, 3, 8)
    mech = strips(1, 3)
    out = mech(q, k, v, pattern="noncausal_self", spatial_shape=(h, w))
    i = 1 * w + 2  # query (1, 2)
    in_column, outside = 3 * w + 2, 3 * w + 4
    for j, changes in ((in_column, True), (outside, False)):
        k2 = k.clone()
        k2[:, j] += 3 * torch.randn_like(k2[:, j])
        moved = mech(q, k2, v, pattern="noncausal_self", spatial_shape=(h, w))
        diff = (out[:, i] - moved[:, i]).abs().amax(-1)  # [1, H]
        assert bool((diff > 1e-4).all()) if changes else torch.equal(out[:, i], moved[:, i])


def test_nan_in_padded_keys_never_leaks():
    h, w = 5, 6
    q, k, v = make_qkv(1, h * w, h * w, 2, 2, 4)
    real = torch.ones(1, h * w, dtype=torch.bool)
    real[0, [3, 17, 29]] = False
    clean = strips_attend(q, k, v, spatial_shape=(h, w), strip=2, key_padding_mask=real, path="strips")
    k2, v2 = k.clone(), v.clone()
    k2[:, ~real[0]] = float("nan")
    v2[:, ~real[0]] = float("inf")
    dirty = strips_attend(q, k2, v2, spatial_shape=(h, w), strip=2, key_padding_mask=real, path="strips")
    assert torch.equal(clean, dirty)


def test_refusals():
    q, k, v = make_qkv(1, 12, 12, 2, 2, 4)
    mech = strips(2, 2)
    for shape in ((12,), (2, 2, 3)):
        with pytest.raises(ShapeError, match=r"2-D spatial_shape \(h, w\); got spatial_shape"):
            mech(q, k, v, pattern="noncausal_self", spatial_shape=shape)
    with pytest.raises(ShapeError):
        mech(q, k, v, pattern="noncausal_self", spatial_shape=(3, 5))
    with pytest.raises(UnsupportedPattern, match="supports: noncausal_self"):
        mech(q, k, v, pattern="noncausal_cross", spatial_shape=(3, 4))
    for bad in ({"strip": 0}, {"strip": -1}, {"strip": 2.0}, {"strip": True}, {"strips": 2}):
        with pytest.raises(InvalidOption, match=next(iter(bad))):
            attnkit.create("strip", heads=2, head_dim=4, form="strips", **bad)


def test_fast_path_never_builds_a_token_by_token_tensor():
    h = w = 32
    t = h * w
    q, k, v = make_qkv(1, t, t, 2, 2, 8)
    mech = strips(3, 2)  # 32 rows and columns: the last strips are padded
    numel, shape = largest_tensor(lambda: mech(q, k, v, pattern="noncausal_self", spatial_shape=(h, w), path="strips"))
    padded = 33
    assert numel <= 2 * padded * padded * 3 * padded, shape  # the strips' scores: H * T' * (s * w') at most
    assert numel < t * t // 4


# ---- form="ssa": S2AFormer's strip self-attention ------------------------------------------------------------


def ssa(heads: int = 4, head_dim: int = 8, seed: int = 0, **options):
    torch.manual_seed(seed)
    return attnkit.create("strip", heads=heads, head_dim=head_dim, **options)


def ssa_literal(mech, q, k, v, shape, real=None, scale=None):
    """Per query i and head: the reduced key and value of every r x r cell that holds a real key, summed tap by
    tap from the keys inside the grid (bias + sum W[a, b] k[i*r + a, j*r + b]), both compressed, then a softmax
    over those cells; fp64, k and v repeated to the query heads; a query that sees no cell outputs 0."""
    b, t, hq, d = q.shape
    q, k, v, real = fp64_per_query_head(q, k, v, real)
    h, w = shape
    r = mech.options.reduction
    p = {name: t.detach().double() for name, t in mech.named_parameters()}
    dc = p["q_compress"].shape[-1]
    scale = (1 / math.sqrt(d) if scale is None else scale) * math.sqrt(d / dc)
    out = torch.zeros(b, t, hq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for head in range(hq):
            keys, values = [], []
            for ci in range(math.ceil(h / r)):
                for cj in range(math.ceil(w / r)):
                    taps = [
                        (a, c, (ci * r + a) * w + cj * r + c)
                        for a in range(r)
                        for c in range(r)
                        if ci * r + a < h and cj * r + c < w and real[bi, (ci * r + a) * w + cj * r + c]
                    ]
                    if not taps:
                        continue
                    kk = p["k_reduce_bias"][head] + sum(p["k_reduce_weight"][head, :, a, c] * k[bi, j, head]
                                                         for a, c, j in taps)  # fmt: skip
                    vv = p["v_reduce_bias"][head] + sum(p["v_reduce_weight"][head, :, a, c] * v[bi, j, head]
                                                         for a, c, j in taps)  # fmt: skip
                    keys.append(kk @ p["k_compress"][head])
                    values.append(vv)
            if not keys:
                continue
            for i in range(t):
                s = torch.stack([(q[bi, i, head] @ p["q_compress"][head]) @ kc for kc in keys]) * scale
                out[bi, i, head] = s.softmax(0) @ torch.stack(values)
    return out


@pytest.mark.parametrize(
    "shape, options, heads, kv_heads, scale",
    [
        ((5, 7), {}, 4, 2, None),  # 5 rows and 7 columns in cells of 2: a thinner last row and column of cells
        ((4, 6), {"reduction": 3, "qk_ratio": 4}, 3, 1, 0.7),  # an explicit scale is rescaled by sqrt(D / D_c)
        ((3, 8), {"reduction": 1, "qk_ratio": 1}, 2, 2, None),
        ((2, 3), {"reduction": 5}, 2, 1, None),  # one cell larger than the grid
    ],
)
def test_ssa_paths_follow_the_literal_loop(shape, options, heads, kv_heads, scale):
    t = shape[0] * shape[1]
    q, k, v = make_qkv(2, t, t, heads, kv_heads, 8, dtype=torch.float64)
    real = torch.rand(2, t, generator=torch.Generator().manual_seed(3)) > 0.4
    real[1, :] = False
    real[1, -1] = True  # batch row 1: one real key, in the last (border) cell
    mech = ssa(heads, 8, **options)
    for mask in (None, real):
        expected = ssa_literal(mech, q, k, v, shape, mask, scale)
        for path in SSA_PATHS:
            out = mech(q, k, v, pattern="noncausal_self", spatial_shape=shape, key_padding_mask=mask, path=path,
                       scale=scale)  # fmt: skip
            assert_close(f"{path} mask={mask is not None}", expected, out, 1e-10)


@pytest.mark.parametrize("path", SSA_PATHS)
def test_ssa_with_identity_reduction_and_compression_is_softmax(path):
    """reduction=1, qk_ratio=1, filters 1 with no bias and identity compressions: every key is its own cell and
    nothing is compressed, so SSA is plain softmax attention (the scale factor sqrt(D / D_c) is 1)."""
    mech = ssa(4, 8, reduction=1, qk_ratio=1)
    with torch.no_grad():
        for name in ("k_reduce_weight", "v_reduce_weight"):
            getattr(mech, name).fill_(1.0)
        for name in ("k_reduce_bias", "v_reduce_bias"):
            getattr(mech, name).zero_()
        for name in ("q_compress", "k_compress"):
            getattr(mech, name).copy_(torch.eye(8).expand(4, 8, 8))
    q, k, v = make_qkv(2, 35, 35, 4, 2, 8)
    real = torch.rand(2, 35, generator=torch.Generator().manual_seed(1)) > 0.3
    for mask in (None, real):
        soft = attnkit.attend(q, k, v, pattern="noncausal_self", key_padding_mask=mask)
        out = mech(q, k, v, pattern="noncausal_self", spatial_shape=(5, 7), key_padding_mask=mask, path=path)
        assert_close(f"{path} mask={mask is not None}", soft, out, 1e-5)


@pytest.mark.parametrize("path", SSA_PATHS)
def test_ssa_border_cells_equal_padding_the_grid_with_masked_keys(path):
    """A 5 x 7 grid in cells of 2 (the last row and column of cells half outside) gives what the 6 x 8 grid gives
    when its extra row and column are padded keys: the zero padding at the bottom and right is masked keys, and a
    cell holding only padding is never attended."""
    h, w = 5, 7
    mech = ssa(2, 8)
    q, k, v = make_qkv(1, h * w, h * w, 2, 2, 8)
    small = mech(q, k, v, pattern="noncausal_self", spatial_shape=(h, w), path=path)
    junk = torch.randn(1, 6, 8, 2, 8)
    big = [junk.clone() for _ in range(3)]
    for t, src in zip(big, (q, k, v), strict=True):
        t[:, :h, :w] = src.view(1, h, w, 2, 8)
    real = torch.zeros(1, 6, 8, dtype=torch.bool)
    real[:, :h, :w] = True
    out = mech(*(t.reshape(1, 48, 2, 8) for t in big), pattern="noncausal_self", spatial_shape=(6, 8),
               key_padding_mask=real.view(1, 48), path=path)  # fmt: skip
    assert_close("border", small, out.view(1, 6, 8, 2, 8)[:, :h, :w].reshape(1, h * w, 2, 8), 1e-5)


def test_ssa_reduction_covering_the_grid_is_one_key():
    """reduction >= h and w: one cell, so every query outputs that cell's reduced value, whatever q and k."""
    mech = ssa(2, 8, reduction=4)
    q, k, v = make_qkv(1, 12, 12, 2, 2, 8)
    out = mech(q, k, v, pattern="noncausal_self", spatial_shape=(3, 4), path="sdpa")
    grid = v.view(1, 3, 4, 2, 8)
    weight, bias = mech.v_reduce_weight.detach(), mech.v_reduce_bias.detach()  # [H, D, 4, 4], [H, D]
    cell = bias + sum(weight[:, :, a, c] * grid[0, a, c] for a in range(3) for c in range(4))  # [H, D]
    assert_close("one cell", cell.expand(1, 12, 2, 8), out, 1e-5)


def test_ssa_nan_in_padded_keys_never_leaks():
    h, w = 5, 6
    mech = ssa(2, 4)
    q, k, v = make_qkv(1, h * w, h * w, 2, 2, 4)
    real = torch.ones(1, h * w, dtype=torch.bool)
    real[0, [0, 1, 6, 7, 17, 29]] = False  # the first cell wholly padded, others partly
    k2, v2 = k.clone(), v.clone()
    k2[:, ~real[0]] = float("nan")
    v2[:, ~real[0]] = float("inf")
    for path in SSA_PATHS:
        clean = mech(q, k, v, pattern="noncausal_self", spatial_shape=(h, w), key_padding_mask=real, path=path)
        dirty = mech(q, k2, v2, pattern="noncausal_self", spatial_shape=(h, w), key_padding_mask=real, path=path)
        assert torch.equal(clean, dirty), path


def test_ssa_parameters_learn_and_both_paths_give_them_the_same_gradients():
    mech = ssa(2, 8, reduction=3, qk_ratio=2)
    q, k, v = make_qkv(2, 35, 35, 2, 1, 8)
    real = torch.rand(2, 35, generator=torch.Generator().manual_seed(2)) > 0.3
    grads = {}
    for path in SSA_PATHS:
        mech.zero_grad()
        out = mech(q, k, v, pattern="noncausal_self", spatial_shape=(5, 7), key_padding_mask=real, path=path)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[path] = {n: p.grad.clone() for n, p in mech.named_parameters()}
    assert sorted(grads["sdpa"]) == sorted(
        ["k_reduce_weight", "k_reduce_bias", "v_reduce_weight", "v_reduce_bias", "q_compress", "k_compress"]
    )
    for name, g in grads["reference"].items():
        assert g.abs().amax() > 0, name
        assert_close(name, g, grads["sdpa"][name], 1e-4)


def test_ssa_parameters_are_drawn_from_the_seed():
    a, b, c = ssa(seed=5), ssa(seed=5), ssa(seed=6)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc), name
    assert a.q_compress.shape == (4, 8, 4) and a.k_reduce_weight.shape == (4, 8, 2, 2)
    assert sum(p.numel() for p in attnkit.create("strip", heads=4, head_dim=8, form="strips").parameters()) == 0


def test_ssa_refusals():
    for bad in ({"reduction": 0}, {"reduction": 65}, {"reduction": 2.0}, {"reduction": True}, {"qk_ratio": 0},
                {"qk_ratio": 9}, {"form": "strip"}):  # fmt: skip
        with pytest.raises(InvalidOption, match=next(k for k in bad if bad[k] is not None)):
            attnkit.create("strip", heads=2, head_dim=8, **bad)
    with pytest.raises(InvalidOption, match="belongs to form='ssa'"):
        attnkit.create("strip", heads=2, head_dim=8, form="strips", reduction=2)
    for given in ({"strip": 2}, {"form": None, "strip": 2}):  # the default form is ssa: strip= alone is refused
        with pytest.raises(InvalidOption, match="strip=2 belongs to form='strips'"):
            attnkit.create("strip", heads=2, head_dim=8, **given)
    with pytest.raises(InvalidOption, match="pass heads= and head_dim="):
        attnkit.create("strip")
    with pytest.raises(AttnkitError, match="trainable parameters"):
        attnkit.attend(*make_qkv(1, 12, 12, 2, 2, 8), "strip", pattern="noncausal_self", spatial_shape=(3, 4))
    mech = ssa(2, 8)
    q, k, v = make_qkv(1, 12, 12, 2, 2, 8)
    with pytest.raises(ShapeError, match=r"2-D spatial_shape \(h, w\)"):
        mech(q, k, v, pattern="noncausal_self", spatial_shape=(12,))
    with pytest.raises(ShapeError, match="head_dim=8"):
        mech(*make_qkv(1, 12, 12, 2, 2, 4), pattern="noncausal_self", spatial_shape=(3, 4))
    with pytest.raises(ShapeError, match="2 heads"):
        mech(*make_qkv(1, 12, 12, 4, 2, 8), pattern="noncausal_self", spatial_shape=(3, 4))
    with pytest.raises(UnsupportedPattern, match="supports: noncausal_self"):
        mech(q, k, v, pattern="causal_self", spatial_shape=(3, 4))
    with pytest.raises(InvalidOption, match="computes form='strips'"):
        mech(q, k, v, pattern="noncausal_self", spatial_shape=(3, 4), path="strips")
    with pytest.raises(InvalidOption, match="computes form='ssa'"):
        strips(1, 2)(q, k, v, pattern="noncausal_self", spatial_shape=(3, 4), path="sdpa")


def test_ssa_fast_path_never_builds_a_token_by_token_tensor():
    h = w = 33
    t = h * w
    mech = ssa(2, 8, reduction=4)  # 33 rows and columns: the last cells are padded
    q, k, v = make_qkv(1, t, t, 2, 2, 8)
    numel, shape = largest_tensor(lambda: mech(q, k, v, pattern="noncausal_self", spatial_shape=(h, w), path="sdpa"))
    cells = 9 * 9
    assert numel <= 2 * t * cells, shape  # the scores over the reduced keys: H * T * S at most
    assert numel < t * t // 4


def test_flops_count_on_the_call_grid():
    mech = ssa(4, 8, reduction=3, qk_ratio=2)
    shape = attnkit.describe.Shape(2, 64, 64, 4, 4, 8, 8, grid=(4, 16))
    cells = 2 * 6  # ceil(4/3) * ceil(16/3)
    expected = 2 * 2 * 4 * (cells * 9 * 16 + (64 + cells) * 8 * 4 + 64 * cells * (4 + 8))
    assert mech.flops(shape, Pattern.NONCAUSAL_SELF) == expected
    square = mech.flops(shape._replace(grid=None), Pattern.NONCAUSAL_SELF)  # the squarest grid: 8 x 8, 9 cells
    assert square == 2 * 2 * 4 * (9 * 9 * 16 + (64 + 9) * 8 * 4 + 64 * 9 * (4 + 8))
    cross = strips(2, 4).flops(shape, Pattern.NONCAUSAL_SELF)  # 2 rows of 16 and 2 columns of 4, 4 shared
    assert cross == 2 * 2 * 4 * 64 * (2 * 16 + 4 * 2 - 4) * 16


def test_the_picture_reads_ssa_weights():
    """viz reads SSA (affine in v: the reduction's bias) as the weight of each cell spread over its keys by the
    value filter: key j of cell c gets p(c) * W_v[head, j mod D, tap of j]."""
    h, w, heads, d, head = 4, 6, 4, 16, 1
    weights = viz.weights("strip", spatial_shape=(h, w), head=head, heads=heads, head_dim=d, seed=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        mech = attnkit.create("strip", heads=heads, head_dim=d)
    q, k = viz.random_qk(h * w, heads, d, 3)
    # the cell weights: one-hot values per cell through the literal loop with identity value filters
    with torch.no_grad():
        mech.v_reduce_weight.fill_(1.0)
        mech.v_reduce_bias.zero_()
    cells = torch.eye(6, dtype=torch.float64)  # 6 cells of 2 x 2 on a 4 x 6 grid, each key carries its cell
    cell_of = torch.tensor([(i // w // 2) * 3 + (i % w) // 2 for i in range(h * w)])
    v = torch.nn.functional.pad(cells[cell_of], (0, d - 6))[None, :, None, :].expand(1, h * w, heads, d) / 4
    mech_for_cells = attnkit.create("strip", heads=heads, head_dim=d)
    mech_for_cells.load_state_dict(mech.state_dict())
    probs = ssa_literal(mech_for_cells, q, k, v, (h, w))[0, :, head, :6]  # [T, 6]: a cell's 4 keys sum to e_c
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        fresh = attnkit.create("strip", heads=heads, head_dim=d)
    taps = torch.tensor([((i // w) % 2) * 2 + (i % w) % 2 for i in range(h * w)])
    filt = fresh.v_reduce_weight.detach()[head].double().reshape(d, 4)  # [D, taps]
    expected = probs[:, cell_of] * filt[torch.arange(h * w) % d, taps]
    assert_close("viz", expected, weights.double(), 1e-5)
