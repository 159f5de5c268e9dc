"""State provenance (issue 8): a decoding state continues only the sequence of the mechanism, options and
shapes that made it. Anything else is refused before any compute, with an error naming both sides.

Generated from the registry: every mechanism with state refuses the states of every other stateful
mechanism, the states of its own other example options, and states made for another head layout.
"""

from __future__ import annotations

import functools

import pytest

import attnkit
from attnkit.errors import InvalidOption, ShapeError
from attnkit.state import KVCache
from attnkit.testing import Case, SpatialCalls, cases, make_qkv

B, T, HQ, HKV, D = 2, 5, 4, 2, 16
# a sequence mechanism's grid form may have no causal_self, hence no state
STATEFUL = [c for c in cases() if c.decodes]
FIRST = {}  # one case per stateful mechanism: its first example options
for _c in STATEFUL:
    FIRST.setdefault(_c.mechanism, _c)
WITH_OPTION_SETS = sorted({c.mechanism for c in STATEFUL if len(c.cls.example_options) > 1})


def _state(case: Case, *, heads: int = HQ, kv_heads: int = HKV, seed: int = 42):
    mech = case.build(heads, D)
    q, k, v = make_qkv(B, T, T, heads, kv_heads, D, seed=seed)
    return mech(q, k, v, pattern="causal_self", return_state=True)[1]


@functools.cache
def _donor_state(mechanism: str):
    return _state(FIRST[mechanism])


def _continue(mech, state, *, heads: int = HQ, kv_heads: int = HKV):
    n = T if isinstance(mech, SpatialCalls) else 3  # a grid continues by whole leading slices of the same size
    q, k, v = make_qkv(B, n, n, heads, kv_heads, D, seed=7)
    return mech(q, k, v, pattern="causal_self", state=state, return_state=True)


@pytest.mark.parametrize("case", STATEFUL, ids=lambda c: c.label)
def test_state_of_another_mechanism_is_refused(case):
    mech = case.build(HQ, D)
    for donor in FIRST:
        if donor == case.mechanism:
            continue
        with pytest.raises(InvalidOption) as err:
            _continue(mech, _donor_state(donor))
        msg = str(err.value)
        assert donor in msg and case.mechanism in msg, f"{donor} -> {case.mechanism}: {msg}"


@pytest.mark.parametrize("name", WITH_OPTION_SETS)
def test_state_of_other_options_is_refused(name):
    cls = attnkit.mechanism.REGISTRY.get(name)
    rank = cls.spatial_dims[0] if cls.spatial else 0  # a spatial mechanism is called on a grid
    first, second = (Case(name, dict(o), rank) for o in _examples(name)[:2])
    for made, used in ((first, second), (second, first)):
        with pytest.raises(InvalidOption) as err:
            _continue(used.build(HQ, D), _state(made))
        msg = str(err.value)
        assert name in msg and "state" in msg
        for key in {**made.options, **used.options}:  # the differing options are named
            assert key in msg, f"{made.label} -> {used.label}: {msg}"


def _examples(name: str):
    return attnkit.mechanism.REGISTRY.get(name).example_options


@pytest.mark.parametrize("case", STATEFUL, ids=lambda c: c.label)
def test_state_of_another_head_layout_is_refused(case):
    """A state made with Hkv = 2 does not continue a call with Hkv = 4 (GQA), nor with other query heads."""
    state = _state(case)
    mech = case.build(HQ, D)
    with pytest.raises(ShapeError, match="state does not fit") as err:
        _continue(mech, state, kv_heads=4)
    assert "kv_heads" in str(err.value)
    if not case.cls.trainable:  # trainable mechanisms are sized for their heads (refused by check_call)
        with pytest.raises(ShapeError, match="state does not fit"):
            _continue(mech, state, heads=8)


@pytest.mark.parametrize("case", STATEFUL, ids=lambda c: c.label)
def test_moved_and_initial_states_continue(case):
    """The record survives ``.to()`` and ``.detach()``; ``init_state`` makes a state the mechanism accepts;
    a second instance with the same options is the same maker (parameters are the caller's business)."""
    state = _state(case)
    twin = case.build(HQ, D)
    _continue(twin, state.to("cpu").detach())
    empty = twin.init_state(B, HQ, D, D)  # Hkv = Hq: retention's init_state keeps one state per given head
    assert empty.made_by is not None and empty.made_by.mechanism == case.mechanism
    _continue(twin, empty, kv_heads=HQ)


def test_known_cases():
    """The cases of the issue, each one silently continuing the wrong sequence before."""
    q, k, v = make_qkv(1, 6, 6, 4, 2, 16)
    _, window = attnkit.attend(q, k, v, "sliding_window", pattern="causal_self", window=4, return_state=True)
    with pytest.raises(InvalidOption, match=r"sliding_window\(window=4\).*softmax"):
        attnkit.attend(q, k, v, "softmax", pattern="causal_self", state=window)
    with pytest.raises(InvalidOption, match=r"window=4.*window=64"):
        attnkit.attend(q, k, v, "sliding_window", pattern="causal_self", window=64, state=window)
    _, elu = attnkit.attend(q, k, v, "linear", pattern="causal_self", return_state=True)
    with pytest.raises(InvalidOption, match="feature_map='elu1'.*feature_map='relu'"):
        attnkit.attend(q, k, v, "linear", pattern="causal_self", feature_map="relu", state=elu)
    _, seed1 = attnkit.attend(q, k, v, "performer", pattern="causal_self", seed=1, return_state=True)
    with pytest.raises(InvalidOption, match="seed=1.*seed=2"):
        attnkit.attend(q, k, v, "performer", pattern="causal_self", seed=2, state=seed1)
    _, ret = attnkit.attend(q, k, v, "retention", pattern="causal_self", return_state=True)
    _, lig = attnkit.attend(q, k, v, "lightning", pattern="causal_self", return_state=True)
    with pytest.raises(InvalidOption, match="retention.*lightning"):
        attnkit.attend(q, k, v, "lightning", pattern="causal_self", state=ret)
    with pytest.raises(InvalidOption, match="lightning.*retention"):
        attnkit.attend(q, k, v, "retention", pattern="causal_self", state=lig)
    q4, k4, v4 = make_qkv(1, 6, 6, 4, 4, 16)
    for name in ("softmax", "retention", "linear"):
        _, st = attnkit.attend(q, k, v, name, pattern="causal_self", return_state=True)
        with pytest.raises(ShapeError, match=r"kv_heads.*\(1, 4, 2, 16, 16\).*\(1, 4, 4, 16, 16\)"):
            attnkit.attend(q4, k4, v4, name, pattern="causal_self", state=st)


def test_performer_drawn_seeds_are_different_makers():
    """Two performers created without a seed draw different features: one's state is not the other's."""
    q, k, v = make_qkv(1, 6, 6, 2, 2, 16)
    a, b = attnkit.create("performer"), attnkit.create("performer")
    _, st = a(q, k, v, pattern="causal_self", return_state=True)
    a(q, k, v, pattern="causal_self", state=st)
    with pytest.raises(InvalidOption, match="seed"):
        b(q, k, v, pattern="causal_self", state=st)
    a.redraw(5)  # new features: the old state no longer continues this mechanism's sequence
    with pytest.raises(InvalidOption, match="seed"):
        a(q, k, v, pattern="causal_self", state=st)


def test_state_without_a_record_is_refused():
    """A state built by hand records no maker: refused, with a message saying how to make one."""
    q, k, v = make_qkv(1, 6, 6, 4, 2, 16)
    with pytest.raises(InvalidOption, match="init_state"):
        attnkit.attend(q, k, v, "softmax", pattern="causal_self", state=KVCache.empty(1, 2, 16, 16))
