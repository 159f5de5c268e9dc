"""The mechanism contract (DESIGN §2), checked over the registry and the source tree.

Every mechanism has its own FLOP formula; no mechanism file imports another mechanism; the modules
import each other without circles; ``path="auto"`` says when it falls back to the reference.
"""

from __future__ import annotations

import math

import pytest

import attnkit
from attnkit import AttnkitError, Pattern
from attnkit.mechanism import REGISTRY, Complexity, Mechanism, Paper, Shape, register_mechanism

# ---- flops() is required ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", REGISTRY.names(), ids=str)
def test_every_mechanism_has_its_own_flops(name):
    cls = REGISTRY.get(name)
    assert cls.flops is not Mechanism.flops, f"{name} has no flops(shape, pattern)"
    mech = attnkit.create(name, heads=4, head_dim=16)
    for pattern in cls.patterns:
        tq = 64 if pattern.is_self else 16
        flops = mech.flops(Shape(2, tq, 64, 4, 2, 16, 16), pattern)
        assert isinstance(flops, int | float) and math.isfinite(flops) and flops > 0, (pattern, flops)


def _throwaway(**methods):
    attrs = {
        "family": "test",
        "paper": Paper("none", 2026),
        "patterns": frozenset(Pattern),
        "exact": False,
        "complexity": Complexity("O(1)", "O(1)"),
        **methods,
    }
    return type("Throwaway", (Mechanism,), attrs)


def _reference(self, x):
    return x.v.repeat_interleave(x.groups, 2)[:, : x.tq], None


@pytest.mark.parametrize("missing", ["flops", "reference"])
def test_a_mechanism_cannot_register_without_flops_or_reference(missing):
    methods = {"reference": _reference, "flops": lambda self, shape, pattern: 1.0}
    del methods[missing]
    cls = _throwaway(**methods)
    try:
        with pytest.raises(AttnkitError) as err:
            register_mechanism("_test_incomplete")(cls)
        assert missing in str(err.value) and "_test_incomplete" in str(err.value)
        assert "_test_incomplete" not in REGISTRY
    finally:
        REGISTRY._entries.pop("_test_incomplete", None)
