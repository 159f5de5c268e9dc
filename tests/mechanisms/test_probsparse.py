"""probsparse: the measurement and selection written out a query at a time, ties, the seeded key sample, memory."""

from __future__ import annotations

import math

import pytest
import torch
from largest_tensor import tensor_shapes

import attnkit
from attnkit.errors import InvalidOption
from attnkit.mechanisms.probsparse import log_count
from attnkit.ops.gqa import repeat_kv
from attnkit.testing import assert_close, make_qkv

PATTERNS = ("noncausal_self", "noncausal_cross")


def probsparse_literal(mech, q, k, v, kpm=None, self_pattern=True):
    """fp64, one row and head at a time: the sampled ranks come from ``mech.key_sample`` (the module's draw);
    M = max - mean of the sampled scores; the u largest (lower index on ties) get softmax, the rest mean(v)."""
    b, tq, h, d = q.shape
    tk = k.shape[1]
    k, v = repeat_kv(k, h // k.shape[2]), repeat_kv(v, h // v.shape[2])
    kpm = torch.ones(b, tk, dtype=torch.bool) if kpm is None else kpm
    c, scale = mech.options.factor, 1 / math.sqrt(d)
    out = torch.zeros(b, tq, h, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        real = [j for j in range(tk) if kpm[bi, j]]
        if not real:
            continue
        queries = [i for i in range(tq) if not self_pattern or kpm[bi, i]]
        sample = [real[r] for r in mech.key_sample(len(real)).tolist()]
        u = log_count(c, len(queries))
        mean_v = v[bi, real].mean(0)  # [H, Dv]
        for hi in range(h):
            m = {}
            for i in queries:
                s = [scale * float(q[bi, i, hi] @ k[bi, j, hi]) for j in sample]
                m[i] = max(s) - sum(s) / len(s)
            active = sorted(queries, key=lambda i: (-m[i], i))[:u]
            for i in range(tq):
                if i in active:
                    w = torch.stack([scale * q[bi, i, hi] @ k[bi, j, hi] for j in real]).softmax(0)
                    out[bi, i, hi] = w @ v[bi, real, hi]
                else:
                    out[bi, i, hi] = mean_v[hi]
    return out


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("padded", [False, True])
def test_paths_equal_the_literal_selection(pattern, padded):
    tk = 40 if pattern == "noncausal_self" else 33
    q, k, v = make_qkv(2, 40, tk, 4, 2, 8, dtype=torch.float64)
    kpm = torch.rand(2, tk, generator=torch.Generator().manual_seed(2)) > 0.3 if padded else None
    mech = attnkit.create("probsparse", factor=2, seed=5)
    want = probsparse_literal(mech, q, k, v, kpm, pattern == "noncausal_self")
    for path in ("reference", "gather"):
        assert_close(path, want, mech(q, k, v, pattern=pattern, key_padding_mask=kpm, path=path), 1e-9)


def test_every_query_active_is_softmax():
    q, k, v = make_qkv(2, 12, 12, 4, 2, 16)
    want = attnkit.attend(q, k, v, mechanism="softmax", pattern="noncausal_self")
    got = attnkit.attend(q, k, v, mechanism="probsparse", pattern="noncausal_self", factor=100, seed=0)
    assert_close("all active", want, got, 2e-5)


def test_lazy_queries_get_the_mean_of_v():
    q, k, v = make_qkv(1, 200, 200, 2, 2, 16)
    mech = attnkit.create("probsparse", factor=1, seed=0)
    out = mech(q, k, v, pattern="noncausal_self")
    lazy = torch.isclose(out, v.mean(dim=1, keepdim=True), atol=1e-6).all(dim=-1)  # [B, T, H]
    assert (lazy.sum(dim=1) == 200 - log_count(1, 200)).all()  # u = ceil(ln 200) = 6 active queries per head


@pytest.mark.parametrize("path", ["reference", "gather"])
def test_ties_go_to_the_lower_query_index(path):
    q, k, v = make_qkv(1, 30, 30, 2, 2, 8)
    q = q[:, :1].expand(-1, 30, -1, -1).contiguous()  # every query equal: every M ties
    mech = attnkit.create("probsparse", factor=1, seed=1)
    act = mech.active_queries(_inputs(mech, q, k, v))
    u = log_count(1, 30)
    assert act.index.shape[-1] == u and (act.index == torch.arange(u)).all()
    out = mech(q, k, v, pattern="noncausal_self", path=path)
    full = attnkit.attend(q, k, v, mechanism="softmax", pattern="noncausal_self")
    assert_close("first u", full[:, :u], out[:, :u], 2e-5)
    assert torch.allclose(out[:, u:], v.mean(dim=1, keepdim=True).expand(-1, 30 - u, -1, -1), atol=1e-6)


def _inputs(mech, q, k, v, pattern="noncausal_self", kpm=None):
    from attnkit.inputs import validate

    return validate(mech, q, k, v, pattern=pattern, scale=None, key_padding_mask=kpm, state=None,
                    return_state=False, spatial_shape=None)  # fmt: skip


def test_key_sample_is_seeded_per_real_key_count():
    a = attnkit.create("probsparse", seed=11)
    b = attnkit.create("probsparse", seed=11)
    assert torch.equal(a.key_sample(500), b.key_sample(500))
    assert len(a.key_sample(500)) == 5 * math.ceil(math.log(500))
    assert int(a.key_sample(500).max()) < 500
    before = a.key_sample(500).clone()
    a.redraw()
    assert not torch.equal(before, a.key_sample(500))
    a.redraw(seed=11)
    assert torch.equal(before, a.key_sample(500))
    assert not torch.equal(attnkit.create("probsparse", seed=12).key_sample(500), before)


def test_draw_depends_on_the_real_keys_not_on_padding_or_queries():
    """The same real keys with padding around them, and a different number of cross queries, give the same
    selection for the shared queries' measurement."""
    mech = attnkit.create("probsparse", factor=1, seed=3)
    q, k, v = make_qkv(1, 50, 30, 2, 2, 8)
    short = mech(q[:, :20], k, v, pattern="noncausal_cross")
    m_short = mech.active_queries(_inputs(mech, q[:, :20], k, v, "noncausal_cross"))
    pad = lambda t: torch.cat([torch.randn_like(t[:, :4]), t, torch.randn_like(t[:, :3])], dim=1)  # noqa: E731
    kpm = torch.zeros(1, 37, dtype=torch.bool)
    kpm[:, 4:34] = True
    padded = mech(q[:, :20], pad(k), pad(v), pattern="noncausal_cross", key_padding_mask=kpm)
    assert_close("padded keys", short, padded, 2e-5)
    m_pad = mech.active_queries(_inputs(mech, q[:, :20], pad(k), pad(v), "noncausal_cross", kpm))
    assert torch.equal(m_short.index, m_pad.index)


def test_gather_path_never_builds_a_queries_by_keys_tensor():
    tq, tk = 301, 257
    q, k, v = make_qkv(1, tq, tk, 2, 2, 8)
    mech = attnkit.create("probsparse", seed=0)
    shapes = tensor_shapes(lambda: mech(q, k, v, pattern="noncausal_cross", path="gather"))
    assert not [s for s in shapes if tq in s and tk in s]
    shapes = tensor_shapes(lambda: mech(q, k, v, pattern="noncausal_cross", path="reference"))
    assert [s for s in shapes if tq in s and tk in s]  # the check would see one


@pytest.mark.parametrize(("name", "bad"), [("factor", 0), ("factor", -1), ("factor", 2**70), ("factor", 1.5),
                                           ("seed", -1), ("seed", 2**70), ("seed", "3")])  # fmt: skip
def test_options_are_validated(name, bad):
    with pytest.raises(InvalidOption, match=name):
        attnkit.create("probsparse", **{name: bad})
