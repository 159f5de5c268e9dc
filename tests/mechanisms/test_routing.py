"""routing: nearest-centroid routing written out, the EMA update outside forward (after_step), causal leaks,
seeds and redraws, saved centroids, option checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from group_literal import group_attention_literal

import attnkit
from attnkit.errors import InvalidOption, ShapeError
from attnkit.testing import assert_close, make_qkv

PATTERNS = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``x [B, T, H, D]`` -> ``[B, H, 1, T]``: index of the closest centroid (Euclidean, unit vectors)."""
    b, t, h, _ = x.shape
    ids = torch.empty(b, h, 1, t, dtype=torch.long)
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                unit = x[bi, ti, hi].double() / x[bi, ti, hi].double().norm()
                dist = (centroids[hi].double() - unit).norm(dim=-1)
                ids[bi, hi, 0, ti] = int(dist.argmin())
    return ids


@pytest.mark.parametrize("pattern", PATTERNS)
def test_routing_equals_cluster_attention_written_out(pattern):
    mech = attnkit.create("routing", heads=4, head_dim=8, num_clusters=3, seed=2, block_size=4)
    tk = 17 if pattern.endswith("self") else 11
    q, k, v = make_qkv(2, 17, tk, 4, 2, 8, dtype=torch.float64)
    q_ids = nearest_centroid(q, mech.centroids)
    k_ids = nearest_centroid(k.repeat_interleave(2, dim=2), mech.centroids)
    want = group_attention_literal(q, k, v, q_ids, k_ids, causal=pattern == "causal_self")
    for path in ("reference", "bucketed"):
        assert_close(f"{pattern} {path}", want, mech(q, k, v, pattern=pattern, path=path), 1e-12)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_one_cluster_is_softmax(pattern):
    mech = attnkit.create("routing", heads=4, head_dim=16, num_clusters=1)
    q, k, v = make_qkv(2, 40, 40 if pattern.endswith("self") else 23, 4, 2, 16)
    want = attnkit.attend(q, k, v, "softmax", pattern=pattern)
    assert_close(pattern, want, mech(q, k, v, pattern=pattern, path="bucketed"), 2e-5)


@pytest.mark.parametrize("path", ["reference", "bucketed"])
def test_future_tokens_never_change_past_outputs(path):
    mech = attnkit.create("routing", heads=2, head_dim=16, num_clusters=4, seed=0, block_size=4)
    q, k, v = make_qkv(1, 60, 60, 2, 2, 16)
    out = mech(q, k, v, pattern="causal_self", path=path)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, 30:] = torch.randn_like(t[:, 30:]) * 3
    moved = mech(q2, k2, v2, pattern="causal_self", path=path)
    assert_close("past", out[:, :30], moved[:, :30], 2e-6)
    assert (out[:, 30:] - moved[:, 30:]).abs().max() > 1e-2


def test_forward_never_moves_the_centroids_and_after_step_applies_the_ema():
    mech = attnkit.create("routing", heads=2, head_dim=8, num_clusters=3, decay=0.9, seed=1)
    before = mech.centroids.clone()
    q, k, v = make_qkv(1, 30, 30, 2, 1, 8, requires_grad=True)
    kpm = torch.ones(1, 30, dtype=torch.bool)
    kpm[0, -5:] = False
    a = mech(q, k, v, pattern="noncausal_self", key_padding_mask=kpm)
    b = mech(q, k, v, pattern="noncausal_self", key_padding_mask=kpm, path="reference")
    assert torch.equal(mech.centroids, before)
    assert_close("paths agree", b, a, 2e-5)
    # two calls, each counting 30 queries and 25 real keys per head
    assert mech.routed_count.sum().item() == 2 * 2 * (30 + 25)

    # the expected update, from the routed unit vectors
    ids = lambda x: torch.einsum("thd,hcd->thc", F.normalize(x, dim=-1), before).argmax(-1)  # noqa: E731
    qs, ks = q[0].detach(), k[0, :25].detach().repeat_interleave(2, dim=1)  # [T, H, D]
    want = before.clone()
    for h in range(2):
        for c in range(3):
            vecs = torch.cat([F.normalize(x[:, h], dim=-1)[ids(x)[:, h] == c] for x in (qs, ks)])
            if len(vecs):
                want[h, c] = F.normalize(0.9 * before[h, c] + 0.1 * vecs.mean(0), dim=0)
    mech.after_step()
    assert torch.allclose(mech.centroids, want, atol=1e-6)
    assert torch.allclose(mech.centroids.norm(dim=-1), torch.ones(2, 3))
    assert mech.routed_count.sum() == 0 and mech.routed_sum.abs().sum() == 0
    mech.after_step()  # nothing routed since: nothing moves
    assert torch.allclose(mech.centroids, want, atol=1e-6)


def test_no_statistics_in_eval_or_without_gradients():
    mech = attnkit.create("routing", heads=2, head_dim=8, num_clusters=3)
    q, k, v = make_qkv(1, 10, 10, 2, 2, 8)
    with torch.no_grad():
        mech(q, k, v, pattern="causal_self")
    mech.eval()
    mech(q, k, v, pattern="causal_self")
    assert mech.routed_count.sum() == 0


def test_chunked_decoding_counts_each_key_once():
    q, k, v = make_qkv(1, 12, 12, 2, 2, 8)
    full = attnkit.create("routing", heads=2, head_dim=8, num_clusters=3, seed=4)
    full(q, k, v, pattern="causal_self")
    chunked = attnkit.create("routing", heads=2, head_dim=8, num_clusters=3, seed=4)
    state = None
    for sl in (slice(0, 5), slice(5, 6), slice(6, 12)):
        _, state = chunked(q[:, sl], k[:, sl], v[:, sl], pattern="causal_self", state=state, return_state=True)
    assert torch.equal(full.routed_count, chunked.routed_count)
    assert torch.allclose(full.routed_sum, chunked.routed_sum, atol=1e-6)


def test_seed_redraw_and_saved_centroids():
    a = attnkit.create("routing", heads=2, head_dim=8, seed=3)
    b = attnkit.create("routing", heads=2, head_dim=8, seed=3)
    assert a.centroids.shape == (2, 64, 8) and torch.equal(a.centroids, b.centroids)
    assert torch.allclose(a.centroids.norm(dim=-1), torch.ones(2, 64))
    a.redraw(4)
    assert not torch.equal(a.centroids, b.centroids)
    a.redraw(3)
    assert torch.equal(a.centroids, b.centroids)
    with torch.no_grad():
        a.centroids.copy_(F.normalize(torch.randn(2, 64, 8), dim=-1))  # as if trained
    c = attnkit.create("routing", heads=2, head_dim=8, seed=9)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.centroids, a.centroids) and c.draw_seed == a.draw_seed
    assert set(a.state_dict()) == {"centroids", "_extra_state"}


def test_sizes_are_checked():
    mech = attnkit.create("routing", heads=2, head_dim=8)
    q, k, v = make_qkv(1, 5, 5, 2, 2, 16)
    with pytest.raises(ShapeError, match="head_dim 8"):
        mech(q, k, v, pattern="noncausal_self")
    with pytest.raises(InvalidOption, match="heads"):
        attnkit.create("routing")


@pytest.mark.parametrize(
    "bad",
    [
        {"num_clusters": 0},
        {"num_clusters": -1},
        {"num_clusters": 2**70},
        {"num_clusters": 2.0},
        {"decay": 1.0},
        {"decay": -0.1},
        {"decay": float("nan")},
        {"seed": -1},
        {"block_size": 0},
    ],
)
def test_bad_options_raise(bad):
    (name,) = bad
    with pytest.raises(InvalidOption, match=name):
        attnkit.create("routing", heads=2, head_dim=8, **bad)


def test_the_quality_training_loop_applies_the_update_after_each_step(monkeypatch):
    from attnkit.bench import quality
    from attnkit.bench.case import Budget
    from attnkit.mechanisms.routing import Routing

    steps = {"after": 0}
    real_after, real_loss = Routing.after_step, quality._loss

    def counting_after_step(self):
        steps["after"] += 1
        assert self.routed_count.sum() > 0, "the step's forward pass routed nothing"
        real_after(self)

    def stop_after_three(task, model, batch):  # the run ends as diverged at step 3
        loss, logits = real_loss(task, model, batch)
        steps.setdefault("loss", 0)
        steps["loss"] += 1
        return (loss * float("nan") if steps["loss"] > 3 else loss), logits

    monkeypatch.setattr(Routing, "after_step", counting_after_step)
    monkeypatch.setattr(quality, "_loss", stop_after_three)
    result = quality.QualityCase("mqar", "routing", "quick").measure(threads=1, budget=Budget())
    assert result["status"] == "diverged"
    assert steps["after"] >= 3 and steps["after"] % 3 == 0  # every routing layer, after each of the 3 steps
