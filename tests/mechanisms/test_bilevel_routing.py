"""bilevel_routing: region routing checked by a loop, all regions give softmax, no leak, no [T, T]."""

from __future__ import annotations

import pytest
import torch
from topk_helpers import future_changes_nothing, largest_call_tensor, softmax_over

import attnkit
from attnkit.errors import InvalidOption
from attnkit.testing import assert_close, make_qkv

PATHS = ("reference", "routed")


def region_loop(q, k, v, region, topk, causal):
    """Noncausal: region means route query regions; causal: each token against completed regions + its own."""
    b, t, h, _ = q.shape
    n = -(-t // region)
    spans = [range(c * region, min((c + 1) * region, t)) for c in range(n)]
    allowed = torch.zeros(b, h, t, t, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            k_mean = [k[bi, list(s), hi].double().mean(0) for s in spans]
            for i in range(t):
                own = i // region
                if causal:
                    cands = range(own)
                    aff = [q[bi, i, hi].double() @ k_mean[c] for c in cands]
                else:
                    cands = range(n)
                    q_mean = q[bi, list(spans[own]), hi].double().mean(0)
                    aff = [q_mean @ k_mean[c] for c in cands]
                chosen = sorted(cands, key=lambda c: (aff[c], c), reverse=True)[:topk]
                for c in [*chosen, own] if causal else chosen:
                    allowed[bi, hi, i, list(spans[c])] = True
                if causal:
                    allowed[bi, hi, i, i + 1 :] = False
    return softmax_over(q, k, v, allowed)


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
@pytest.mark.parametrize("path", PATHS)
def test_routing_matches_a_loop(pattern, path):
    q, k, v = make_qkv(1, 22, 22, 2, 2, 8, dtype=torch.float64)
    mech = attnkit.create("bilevel_routing", region=4, topk=2)
    expected = region_loop(q, k, v, 4, 2, pattern == "causal_self")
    assert_close(path, expected, mech(q, k, v, pattern=pattern, path=path), 1e-9)


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
@pytest.mark.parametrize("path", PATHS)
def test_every_region_routed_is_softmax(pattern, path):
    q, k, v = make_qkv(2, 37, 37, 4, 2, 16, dtype=torch.float64)
    mech = attnkit.create("bilevel_routing", region=4, topk=10)
    expected = attnkit.create("softmax")(q, k, v, pattern=pattern)
    assert_close(path, expected, mech(q, k, v, pattern=pattern, path=path), 1e-9)


@pytest.mark.parametrize("path", PATHS)
def test_no_causal_leak(path):
    future_changes_nothing(attnkit.create("bilevel_routing", region=4, topk=2), path)


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
def test_routed_path_never_builds_t_by_t(pattern):
    t = 512
    q, k, v = make_qkv(1, t, t, 1, 1, 16)
    mech = attnkit.create("bilevel_routing", region=32, topk=2)
    assert largest_call_tensor(mech, q, k, v, pattern, "routed") < t * t // 2


@pytest.mark.parametrize("bad", [0, -1, 2**70, 1.5, "4", True])
@pytest.mark.parametrize("name", ["region", "topk"])
def test_options_are_validated(name, bad):
    with pytest.raises(InvalidOption, match=name):
        attnkit.create("bilevel_routing", **{name: bad})
