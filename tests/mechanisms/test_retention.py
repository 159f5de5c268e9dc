"""retention: RetNet's formulas written out in fp64; parallel, chunkwise and recurrent forms agree (outputs
and final states); one decay and one state per query head under GQA; the gammas option."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.errors import InvalidOption, ShapeError
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
