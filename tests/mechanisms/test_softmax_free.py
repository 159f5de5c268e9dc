"""softmax_free (SOFT): the reference against a literal, loop-by-loop transcription in fp64; exactness when
every token is a landmark; the landmark pooling and the Newton–Schulz pseudo-inverse on their own."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.errors import UnsupportedPattern
from attnkit.mechanisms.softmax_free import landmark_pools, newton_pinv
from attnkit.testing import assert_close, make_qkv


def literal(q, k, v, *, landmarks, iters, ridge, normalize, kpm=None, self_pattern=True):
    """Row by row and head by head, with Python loops for pooling, kernels and the Newton iterations."""
    b, tq, hq, d = q.shape
    tk, root = k.shape[1], (1 / math.sqrt(d)) ** 0.5
    out = torch.zeros(b, tq, hq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        keys = [j for j in range(tk) if kpm is None or bool(kpm[bi, j])]
        queries = keys if self_pattern else list(range(tq))
        c = min(landmarks, len(keys), len(queries))
        if c == 0:
            continue
        for h in range(hq):
            kv_h = h // (hq // k.shape[2])
            qs = [q[bi, i, h] * root for i in range(tq)]
            ks = [k[bi, j, kv_h] * root for j in range(tk)]

            def pool(tokens, vectors, c=c):
                groups = [[t for r, t in enumerate(tokens) if r * c // len(tokens) == a] for a in range(c)]
                return [sum(vectors[t] for t in g) / len(g) for g in groups]

            q_lm, k_lm = pool(queries, qs), pool(keys, ks)

            def kern(x, y):
                return math.exp(-0.5 * float(((x - y) ** 2).sum()))

            K1 = torch.tensor([[kern(qs[i], k_lm[a]) for a in range(c)] for i in range(tq)], dtype=torch.float64)
            K2 = torch.tensor([[kern(q_lm[a], k_lm[e]) for e in range(c)] for a in range(c)], dtype=torch.float64)
            K3 = torch.tensor([[kern(q_lm[a], ks[j]) if j in keys else 0.0 for j in range(tk)] for a in range(c)],
                              dtype=torch.float64)  # fmt: skip
            P = K2 + ridge * torch.eye(c, dtype=torch.float64)
            row = max(sum(abs(float(P[a, e])) for e in range(c)) for a in range(c))
            col = max(sum(abs(float(P[a, e])) for a in range(c)) for e in range(c))
            V = 1.8 / (row * col) * P.T
            for _ in range(iters):
                V = 2 * V - V @ P @ V
            if normalize:
                dd = [1 / math.sqrt(float(K2[a].sum())) for a in range(c)]
                V = torch.tensor([[dd[a] * float(V[a, e]) * dd[e] for e in range(c)] for a in range(c)],
                                 dtype=torch.float64)  # fmt: skip
            A = K1 @ V @ K3  # [Tq, Tk]
            for i in range(tq):
                out[bi, i, h] = sum(A[i, j] * v[bi, j, kv_h] for j in range(tk))
    return out


@pytest.mark.parametrize(
    "opts", [dict(landmarks=4, iters=20, ridge=0.01, normalize=False), dict(landmarks=3, iters=7, ridge=0.0,
                                                                             normalize=True)]
)  # fmt: skip
@pytest.mark.parametrize("pattern", ["noncausal_self", "noncausal_cross"])
def test_reference_is_the_literal_formula(opts, pattern):
    tk = 13 if pattern == "noncausal_self" else 10
    q, k, v = make_qkv(2, 13, tk, 4, 2, 6, dtype=torch.float64)
    kpm = torch.ones(2, tk, dtype=torch.bool)
    kpm[0, :2], kpm[1, 5], kpm[1, -1] = False, False, False  # padding at the start, inside and at the end
    want = literal(q, k, v, kpm=kpm, self_pattern=pattern == "noncausal_self", **opts)
    options = dict(landmarks=opts["landmarks"], newton_iters=opts["iters"], ridge=opts["ridge"],
                   normalize=opts["normalize"])  # fmt: skip
    for path in ("reference", "lowrank"):
        got = attnkit.attend(q, k, v, "softmax_free", pattern=pattern, key_padding_mask=kpm, path=path, **options)
        assert_close(path, want, got, 1e-10)


def test_every_token_a_landmark_is_exact_gaussian_attention():
    """With tied q = k (as in SOFT), m = T, no ridge and enough iterations, S pinv(S) S = S."""
    q, _, v = make_qkv(1, 24, 24, 2, 2, 8, dtype=torch.float64)
    exact = torch.einsum("bhij,bjhe->bihe", torch.exp(-0.5 * torch.cdist(q.transpose(1, 2), q.transpose(1, 2)) ** 2
                                                      / math.sqrt(8)), v)  # fmt: skip
    got = attnkit.attend(q, q, v, "softmax_free", pattern="noncausal_self", landmarks=24, ridge=0.0, newton_iters=40)
    assert_close("m = T", exact, got, 1e-9)
    errors = [
        (attnkit.attend(q, q, v, "softmax_free", pattern="noncausal_self", landmarks=m, newton_iters=40) - exact).norm()
        for m in (2, 6, 24)
    ]
    assert errors[0] > errors[1] > errors[2], errors  # more landmarks, closer to the full kernel


def test_landmarks_pool_only_real_tokens():
    real = torch.tensor([[False, True, True, True, True, False, True], [True] * 7])
    w = landmark_pools(real, torch.tensor([2, 3]), 4, torch.float64)  # [B, m, T]
    # row 0: real tokens 1, 2, 3, 4, 6 (ranks 0..4) -> landmarks {1, 2, 3} and {4, 6}; slots 2, 3 empty
    assert torch.equal(w[0, 0], torch.tensor([0, 1, 1, 1, 0, 0, 0], dtype=torch.float64) / 3)
    assert torch.equal(w[0, 1], torch.tensor([0, 0, 0, 0, 1, 0, 1], dtype=torch.float64) / 2)
    assert w[0, 2:].abs().sum() == 0 and w[1, 3].abs().sum() == 0
    assert torch.allclose(w[1, :3].sum(-1), torch.ones(3, dtype=torch.float64))
    assert (w[0, :, ~real[0]] == 0).all()


def test_newton_pinv_converges_and_keeps_empty_landmarks_empty():
    g = torch.Generator().manual_seed(0)
    P = torch.eye(6, dtype=torch.float64) * 2 + 0.3 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    assert_close("pinv", torch.linalg.pinv(P), newton_pinv(P, 30), 1e-12)
    P[4], P[:, 4] = 0.0, 0.0  # a landmark that does not exist
    V = newton_pinv(P, 40)
    assert (V[4] == 0).all() and (V[:, 4] == 0).all()
    keep = [0, 1, 2, 3, 5]
    assert_close("sub-pinv", torch.linalg.pinv(P[keep][:, keep]), V[keep][:, keep], 1e-10)
    assert (newton_pinv(torch.zeros(2, 3, 3), 5) == 0).all()


def test_fewer_real_tokens_than_landmarks_and_bf16():
    q, k, v = make_qkv(2, 9, 9, 4, 4, 16, dtype=torch.bfloat16)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, 3:6] = True  # three real tokens, 64 landmarks asked for
    out = attnkit.attend(q, k, v, "softmax_free", pattern="noncausal_self", key_padding_mask=kpm)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and (out[1] == 0).all()
    ref = attnkit.attend(q, k, v, "softmax_free", pattern="noncausal_self", key_padding_mask=kpm, path="reference")
    assert_close("bf16", ref.float(), out.float(), 2e-2)


def test_causal_patterns_are_refused():
    q, k, v = make_qkv(1, 8, 8, 2, 2, 8)
    for pattern in ("causal_self", "causal_cross"):
        with pytest.raises(UnsupportedPattern, match="noncausal_cross, noncausal_self"):
            attnkit.attend(q, k, v, "softmax_free", pattern=pattern)
