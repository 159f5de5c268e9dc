"""retention: RetNet's formulas written out in fp64; parallel, chunkwise and recurrent forms agree (outputs
and final states); one decay and one state per query head under GQA; the gammas option."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from largest_tensor import largest_tensor

import attnkit
from attnkit.describe import Shape
from attnkit.errors import InvalidOption, ShapeError
from attnkit.patterns import Pattern
from attnkit.testing import assert_close, make_qkv, random_chunks


def retnet_gammas(h: int) -> list[float]:
    return [1 - 2 ** (-5 - i) for i in range(h)]


def parallel_form(q, k, v, gammas, causal):
    """Retention(X) = (Q K^T / sqrt(d) ⊙ D) V with D_nm = gamma^(n-m) [n >= m] (RetNet) or gamma^|n-m| (RMT)."""
    b, t, h, d = q.shape
    k, v = k.repeat_interleave(h // k.shape[2], 2), v.repeat_interleave(h // v.shape[2], 2)
    out = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    for head in range(h):
        for n in range(t):
            for m in range(t if not causal else n + 1):
                w = gammas[head] ** abs(n - m) * (q[:, n, head] * k[:, m, head]).sum(-1) / math.sqrt(d)
                out[:, n, head] += w[:, None] * v[:, m, head]
    return out


def recurrent_form(q, k, v, gammas):
    """S_n = gamma S_(n-1) + k_n^T v_n, o_n = q_n S_n / sqrt(d); returns outputs and the final S."""
    b, t, h, d = q.shape
    k, v = k.repeat_interleave(h // k.shape[2], 2), v.repeat_interleave(h // v.shape[2], 2)
    g = torch.tensor(gammas, dtype=torch.float64)[None, :, None, None]
    S = torch.zeros(b, h, d, v.shape[-1], dtype=torch.float64)
    outs = []
    for n in range(t):
        S = g * S + k[:, n, :, :, None] * v[:, n, :, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, n], S) / math.sqrt(d))
    return torch.stack(outs, 1), S


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
def test_reference_and_paths_equal_the_parallel_form(pattern):
    q, k, v = make_qkv(2, 13, 13, 4, 2, 8, dtype=torch.float64)
    expected = parallel_form(q, k, v, retnet_gammas(4), causal=pattern == "causal_self")
    paths = ["reference", "chunk", "recurrent"] if pattern == "causal_self" else ["reference", "bidirectional"]
    for path in paths:
        out = attnkit.attend(q, k, v, "retention", pattern=pattern, path=path, chunk_size=4)
        assert_close(path, expected, out, 1e-10)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_parallel_chunkwise_and_recurrent_forms_agree_with_their_final_states(chunk_size):
    q, k, v = make_qkv(2, 37, 37, 4, 4, 8, dtype=torch.float64)
    gammas = [0.3, 0.8, 0.97, 1.0]
    expected, final = recurrent_form(q, k, v, gammas)
    for path in ("reference", "chunk", "recurrent"):
        out, st = attnkit.attend(
            q, k, v, "retention", pattern="causal_self", path=path, return_state=True, gammas=gammas,
            chunk_size=chunk_size,
        )  # fmt: skip
        assert_close(path, expected, out, 1e-10)
        assert_close(f"{path} state", final, st.S.double(), 1e-6)  # the state is kept in fp32
        assert st.z is None and st.offset == 37


def test_forms_hand_the_state_to_each_other():
    """Prefill with the parallel form, continue with the chunkwise one, decode with the recurrent one."""
    q, k, v = make_qkv(1, 40, 40, 4, 2, 16)
    full = attnkit.attend(q, k, v, "retention", pattern="causal_self", path="reference")
    outs, st = [], None
    steps = (((0, 17), "reference"), ((17, 35), "chunk"), ((35, 36), "recurrent"), ((36, 40), "chunk"))
    for (a, b), path in steps:
        o, st = attnkit.attend(
            q[:, a:b], k[:, a:b], v[:, a:b], "retention", pattern="causal_self", path=path, state=st, return_state=True
        )
        outs.append(o)
    assert_close("handed over", full, torch.cat(outs, 1), 1e-5)


def test_every_query_head_of_a_group_has_its_own_decay():
    """GQA: two query heads with the same q and the same kv head still differ (different gammas), and the
    state holds one S per query head."""
    q, k, v = make_qkv(1, 20, 20, 2, 1, 8)
    q = q[:, :, :1].expand(-1, -1, 2, -1).contiguous()
    out, st = attnkit.attend(q, k, v, "retention", pattern="causal_self", return_state=True)
    assert (out[0, -1, 0] - out[0, -1, 1]).abs().max() > 1e-3
    assert st.S.shape == (1, 2, 8, 8)
    expected = parallel_form(q.double(), k.double(), v.double(), retnet_gammas(2), causal=True)
    assert_close("gqa", expected, out, 1e-5)


def test_default_gammas_are_retnets():
    mech = attnkit.create("retention")
    gammas = torch.exp(mech.head_log_decays(8))
    assert torch.allclose(gammas, torch.tensor(retnet_gammas(8), dtype=torch.float64))
    assert gammas[0] == 1 - 1 / 32 and gammas[-1] == 1 - 2**-12


def test_one_gamma_serves_every_head():
    q, k, v = make_qkv(1, 12, 12, 4, 2, 8, dtype=torch.float64)
    one = attnkit.attend(q, k, v, "retention", pattern="causal_self", gammas=(0.8,))
    assert_close("broadcast", parallel_form(q, k, v, [0.8] * 4, causal=True), one, 1e-10)


def test_gamma_one_is_plain_unnormalised_linear_attention():
    q, k, v = make_qkv(1, 9, 9, 2, 2, 4, dtype=torch.float64)
    out = attnkit.attend(q, k, v, "retention", pattern="causal_self", gammas=(1.0, 1.0))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k).tril() / 2.0  # scale 1/sqrt(4)
    assert_close("linear", torch.einsum("bhqk,bkhe->bqhe", scores, v), out, 1e-12)


def test_scale_is_the_calls():
    q, k, v = make_qkv(1, 9, 9, 2, 2, 4, dtype=torch.float64)
    base = attnkit.attend(q, k, v, "retention", pattern="causal_self")
    twice = attnkit.attend(q, k, v, "retention", pattern="causal_self", scale=1.0)
    assert_close("scale", 2 * base, twice, 1e-12)  # default scale is 1/sqrt(4) = 1/2


def test_bad_gammas_and_states_raise():
    q, k, v = make_qkv(1, 5, 5, 4, 2, 8)
    with pytest.raises(InvalidOption, match="3 values but q has 4 heads"):
        attnkit.attend(q, k, v, "retention", pattern="causal_self", gammas=(0.9, 0.9, 0.9))
    for bad in [(0.0, 0.5), (1.5,), "0.9", ()]:
        with pytest.raises(InvalidOption, match="gammas"):
            attnkit.create("retention", gammas=bad)
    _, st = attnkit.attend(q, k, v, "retention", pattern="causal_self", return_state=True)
    q2 = q[:, :, :2]  # 2 query heads: the state holds 4
    with pytest.raises(ShapeError, match=r"state does not fit.*\(1, 4, 2, 8, 8\).*\(1, 2, 2, 8, 8\)"):
        attnkit.attend(q2, k, v, "retention", pattern="causal_self", state=st)
    with pytest.raises(attnkit.UnsupportedPattern):
        attnkit.attend(q, k, v, "retention", pattern="noncausal_cross")


def test_decoding_many_steps_keeps_a_constant_state():
    q, k, v = make_qkv(1, 60, 60, 2, 2, 8)
    full = attnkit.attend(q, k, v, "retention", pattern="causal_self")
    st, outs, start, sizes = None, [], 0, set()
    for n in random_chunks(60, seed=1):
        o, st = attnkit.attend(
            q[:, start : start + n], k[:, start : start + n], v[:, start : start + n], "retention",
            pattern="causal_self", state=st, return_state=True,
        )  # fmt: skip
        outs.append(o)
        sizes.add(st.nbytes)
        start += n
    assert_close("decoded", full, torch.cat(outs, 1), 1e-5)
    assert sizes == {2 * 8 * 8 * 4}


# ---- the grid form: RMT's Manhattan decay ------------------------------------------------------------------


def manhattan_form(q, k, v, gammas, grid):
    """Retention on a grid, one query at a time: out_n = sum_m gamma^(|x_n - x_m| + |y_n - y_m|) (q_n.k_m / sqrt(d))
    v_m, with each token's coordinates from its row-major index (itertools, not attnkit's grid helpers)."""
    b, t, h, d = q.shape
    k, v = k.repeat_interleave(h // k.shape[2], 2), v.repeat_interleave(h // v.shape[2], 2)
    where = list(itertools.product(*(range(s) for s in grid)))  # row-major: the last axis fastest
    out = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    for head in range(h):
        for n in range(t):
            for m in range(t):
                distance = sum(abs(a - c) for a, c in zip(where[n], where[m], strict=True))
                w = gammas[head] ** distance * (q[:, n, head] * k[:, m, head]).sum(-1) / math.sqrt(d)
                out[:, n, head] += w[:, None] * v[:, m, head]
    return out


def grid_call(q, k, v, grid, path, **options):
    return attnkit.attend(q, k, v, "retention", pattern="noncausal_self", spatial_shape=grid, path=path, **options)


@pytest.mark.parametrize("grid", [(3, 5), (1, 7), (4, 1), (2, 3, 4)], ids=str)
def test_grid_form_equals_the_literal_manhattan_sum(grid):
    t = math.prod(grid)
    q, k, v = make_qkv(2, t, t, 4, 2, 8, dtype=torch.float64)  # GQA: each query head keeps its own gamma
    gammas = [0.9, 0.5, 0.99, 0.7]
    expected = manhattan_form(q, k, v, gammas, grid)
    for path in ("reference", "bidirectional", "auto"):
        assert_close(path, expected, grid_call(q, k, v, grid, path, gammas=gammas), 1e-10)


@pytest.mark.parametrize("grid", [(7, 9), (1, 7), (10, 20), (5, 4, 6)], ids=str)
def test_fp32_scan_is_accurate_with_gammas_near_one_and_near_zero(grid):
    """The scans build every weight as a product of decays <= 1 (never gamma^-n): fp32 holds 2e-5 against fp64."""
    t = math.prod(grid)
    q, k, v = make_qkv(1, t, t, 4, 4, 8, dtype=torch.float64)
    gammas = (0.999, 0.1, 0.9999, 1e-3)
    expected = grid_call(q, k, v, grid, "reference", gammas=gammas)
    out = grid_call(q.float(), k.float(), v.float(), grid, "bidirectional", gammas=gammas)
    assert_close("fp32", expected, out, 2e-5)


def test_the_decay_is_manhattan_on_the_grid_and_does_not_wrap_at_borders():
    """With q = k = e_0, scale 1 and one-hot values, the output is D itself: gamma^(|dy| + |dx|). On a 7 x 9 grid
    the raster neighbours (0, 8) and (1, 0) are 9 apart, not 1 as in the 1-D form over the raster order."""
    grid, gamma = (7, 9), 0.5
    t = math.prod(grid)
    q = torch.zeros(1, t, 1, t, dtype=torch.float64)
    q[..., 0] = 1.0
    v = torch.eye(t, dtype=torch.float64)[None, :, None, :]  # v_m = e_m: out[n, m] = D_nm
    for path in ("reference", "bidirectional"):
        D = grid_call(q, q, v, grid, path, gammas=(gamma,), scale=1.0)[0, :, 0]  # [T, T]
        for n, m, distance in [(8, 9, 9), (8, 8, 0), (0, t - 1, 6 + 8), (4 * 9 + 4, 4 * 9 + 5, 1), (4, 31, 3)]:
            assert D[n, m] == pytest.approx(gamma**distance, rel=1e-12), (path, n, m)
        assert torch.allclose(D, D.T)
    raster = attnkit.attend(q, q, v, "retention", pattern="noncausal_self", gammas=(gamma,), scale=1.0)[0, :, 0]
    assert raster[8, 9] == pytest.approx(gamma)  # the 1-D form: raster neighbours


def test_a_grid_with_one_long_axis_is_the_1d_form():
    q, k, v = make_qkv(2, 12, 12, 2, 2, 8, dtype=torch.float64)
    seq = attnkit.attend(q, k, v, "retention", pattern="noncausal_self", path="bidirectional")
    for grid in [(12,), (1, 12), (12, 1), (1, 12, 1)]:
        assert_close(str(grid), seq, grid_call(q, k, v, grid, "auto"), 1e-12)
        assert attnkit.last_path() == "bidirectional"


def test_padded_keys_on_the_grid_are_absent_and_poison_nothing():
    grid = (5, 7)
    t = math.prod(grid)
    q, k, v = make_qkv(2, t, t, 2, 2, 8, dtype=torch.float64)
    kpm = torch.ones(2, t, dtype=torch.bool)
    kpm[0, [0, 8, 34]] = False  # a corner, the middle, the opposite corner
    kpm[1] = False  # a row with no key: outputs 0
    k[~kpm], v[~kpm] = float("nan"), float("inf")
    zeroed_k, zeroed_v = torch.where(kpm[..., None, None], k, 0.0), torch.where(kpm[..., None, None], v, 0.0)
    expected = manhattan_form(q, zeroed_k, zeroed_v, retnet_gammas(2), grid)
    for path in ("reference", "bidirectional"):
        out = grid_call(q, k, v, grid, path, key_padding_mask=kpm)
        assert_close(path, expected, out, 1e-10)
        assert (out[1] == 0).all()


def test_grid_gradients_of_the_scan_are_exact():
    grid = (3, 4)
    q, k, v = make_qkv(1, 12, 12, 2, 1, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: grid_call(q, k, v, grid, "bidirectional"), (q, k, v))


def test_the_scan_builds_no_t_by_t_tensor():
    grid = (20, 30)
    t = math.prod(grid)
    q, k, v = make_qkv(1, t, t, 2, 2, 4)
    biggest, shape = largest_tensor(lambda: grid_call(q, k, v, grid, "bidirectional"))
    # the field [B, H, 20, 30, Dk, Dv] is 19200 elements and an axis's decay matrix, broadcast over the rows,
    # H x T x 30 = 36000; T^2 is 360000
    assert biggest <= max(2 * t * 16, 2 * t * max(grid)) < t * t / 5, shape
    dense, _ = largest_tensor(lambda: grid_call(q, k, v, grid, "reference"))
    assert dense >= t * t  # the reference's explicit D: the recorder sees T x T tensors when there are some


def test_grid_refusals_name_what_was_given():
    q, k, v = make_qkv(1, 12, 12, 2, 2, 8)
    with pytest.raises(attnkit.UnsupportedPattern, match=r"grid form.*causal_self.*noncausal_self"):
        attnkit.attend(q, k, v, "retention", pattern="causal_self", spatial_shape=(3, 4))
    with pytest.raises(ShapeError, match=r"2-D/3-D grids.*\(1, 2, 3, 2\)"):
        attnkit.attend(q, k, v, "retention", pattern="noncausal_self", spatial_shape=(1, 2, 3, 2))
    with pytest.raises(ShapeError, match="spatial_shape"):
        attnkit.attend(q, k, v, "retention", pattern="noncausal_self", spatial_shape=(3, 5))
    with pytest.raises(InvalidOption, match="3 values but q has 2 heads"):
        attnkit.attend(q, k, v, "retention", pattern="noncausal_self", spatial_shape=(3, 4), gammas=(0.5,) * 3)
    with pytest.raises(InvalidOption, match="noncausal_self"):
        attnkit.attend(q, k, v, "retention", pattern="noncausal_self", spatial_shape=(3, 4), return_state=True)


def test_flops_count_the_scans_along_the_calls_grid():
    mech = attnkit.create("retention")
    one = Shape(2, 64, 64, 4, 4, 8, 16)
    field = 2 * 64 * 4 * 8 * 16  # elements of the field k v^T over batch and heads
    nc = Pattern.NONCAUSAL_SELF
    assert mech.flops(one._replace(grid=(8, 8)), nc) == field * (2 + 5 * 2 + 2)
    assert mech.flops(one._replace(grid=(4, 4, 4)), nc) == field * (2 + 5 * 3 + 2)
    assert mech.flops(one._replace(grid=(1, 64)), nc) == field * (2 + 5 + 2)  # an axis of one needs no scan
    assert mech.flops(one._replace(grid=(64,)), nc) == mech.flops(one, nc)  # 1-D: the chunked scans' count
    assert mech.flops(one, Pattern.CAUSAL_SELF) == mech.flops(one._replace(grid=(64,)), Pattern.CAUSAL_SELF)


@pytest.mark.parametrize("gamma", [0.999, 0.5, 1e-3])
def test_manhattan_axis_filters_agree(gamma, monkeypatch):
    """The dense n x n matmul (short axes) and the two-sided scan (long axes) are the same filter."""
    from attnkit.ops import manhattan

    x = torch.randn(2, 3, 9, 7, 4, dtype=torch.float64)  # [B, H, rows, cols, F]
    log_decay = torch.log(torch.tensor([gamma, 0.9, 0.2], dtype=torch.float64))
    for dim in (2, 3):
        by_matmul = manhattan.two_sided_matmul(x, log_decay, dim)
        decay = torch.exp(log_decay).view(1, 3, 1, 1)
        by_scan = manhattan.two_sided_filter(x, decay, dim)
        torch.testing.assert_close(by_matmul, by_scan, rtol=1e-12, atol=1e-12)
    # and through the mechanism: every axis scanned gives the same output as every axis multiplied
    q, k, v = (torch.randn(1, 63, 2, 8) for _ in range(3))
    mech = attnkit.create("retention", gammas=(gamma,))
    dense = mech(q, k, v, pattern="noncausal_self", spatial_shape=(7, 9))
    monkeypatch.setattr(manhattan, "MATMUL_AXIS", 1)
    scanned = mech(q, k, v, pattern="noncausal_self", spatial_shape=(7, 9))
    torch.testing.assert_close(dense, scanned, rtol=2e-5, atol=2e-5)
