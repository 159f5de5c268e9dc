"""linear: the reference equals the RNN form of the paper; state is constant-size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.testing import assert_close, make_qkv


def rnn_form(q, k, v, feature_map, eps=1e-6):
    """S_t = S_{t-1} + phi(k_t) v_t^T, z_t = z_{t-1} + phi(k_t), out_t = phi(q_t) S_t / (phi(q_t) z_t + eps)."""
    phi = {"elu1": lambda x: F.elu(x) + 1, "relu": F.relu, "identity": lambda x: x}[feature_map]
    b, t, h, d = q.shape
    g = h // k.shape[2]
    q, k, v = phi(q.double()), phi(k.double()).repeat_interleave(g, 2), v.double().repeat_interleave(g, 2)
    S = torch.zeros(b, h, d, v.shape[-1], dtype=torch.float64)
    z = torch.zeros(b, h, d, dtype=torch.float64)
    outs = []
    for i in range(t):
        S = S + torch.einsum("bhd,bhe->bhde", k[:, i], v[:, i])
        z = z + k[:, i]
        num = torch.einsum("bhd,bhde->bhe", q[:, i], S)
        den = torch.einsum("bhd,bhd->bh", q[:, i], z)[..., None]
        outs.append(num / (den + eps))
    return torch.stack(outs, 1)


@pytest.mark.parametrize("feature_map", ["elu1", "relu", "identity"])
def test_reference_equals_the_rnn_form(feature_map):
    q, k, v = make_qkv(2, 15, 15, 4, 2, 8, dtype=torch.float64)
    ref = attnkit.attend(q, k, v, "linear", pattern="causal_self", path="reference", feature_map=feature_map)
    assert_close(feature_map, rnn_form(q, k, v, feature_map), ref, 1e-9)
    chunk = attnkit.attend(q, k, v, "linear", pattern="causal_self", path="chunk", feature_map=feature_map)
    assert_close(feature_map + " chunk", ref, chunk, 1e-9)


def test_noncausal_is_the_last_step_of_the_rnn_for_every_query():
    q, k, v = make_qkv(1, 9, 9, 2, 2, 8, dtype=torch.float64)
    out = attnkit.attend(q, k, v, "linear", pattern="noncausal_self")
    # every query sees all keys: query i's output is the RNN output at step T with query i
    for i in range(9):
        qi = q[:, i : i + 1].expand(-1, 9, -1, -1)
        assert_close(f"q{i}", rnn_form(qi, k, v, "elu1")[:, -1], out[:, i], 1e-9)


@pytest.mark.parametrize("chunk_size", [1, 3, 64, 1000])
def test_chunk_size_changes_nothing(chunk_size):
    q, k, v = make_qkv(2, 70, 70, 4, 1, 8)
    base = attnkit.attend(q, k, v, "linear", pattern="causal_self", path="reference")
    out = attnkit.attend(q, k, v, "linear", pattern="causal_self", path="chunk", chunk_size=chunk_size)
    assert_close("chunk", base, out, 1e-5)


def test_state_is_constant_size():
    sizes = []
    for t in (5, 50, 500):
        q, k, v = make_qkv(1, t, t, 4, 2, 8)
        _, st = attnkit.attend(q, k, v, "linear", pattern="causal_self", return_state=True)
        sizes.append(st.nbytes)
    assert len(set(sizes)) == 1
