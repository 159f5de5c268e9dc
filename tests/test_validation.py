"""Bad calls raise typed errors before any compute, the same way for every mechanism (DESIGN §1.6).

Names and paths of the wrong type, empty sizes, head counts, and every option of every registered
mechanism at and beyond its declared bounds. Generated from the registry: a new mechanism is checked
without new code here.
"""

from __future__ import annotations

import pytest

import attnkit
from attnkit import InvalidOption, UnknownMechanism
from attnkit.testing import make_qkv

# ---- names and paths of the wrong type ------------------------------------------------------------


@pytest.mark.parametrize("name", [3, None, 2.5, ("softmax",), b"softmax"], ids=repr)
def test_non_string_mechanism_names_raise_unknown_mechanism(name):
    q, k, v = make_qkv(1, 4, 4, 2, 2, 8)
    for call in (
        lambda: attnkit.attend(q, k, v, mechanism=name, pattern="causal_self"),
        lambda: attnkit.create(name),
        lambda: attnkit.info(name),
        lambda: attnkit.mechanisms(name),
        lambda: attnkit.Attention(16, heads=2, mechanism=name),
    ):
        with pytest.raises(UnknownMechanism) as err:
            call()
        msg = str(err.value)
        assert repr(name) in msg and "string" in msg and "softmax" in msg, msg


@pytest.mark.parametrize("path", [3, None, b"sdpa", ["sdpa"]], ids=repr)
def test_non_string_path_raises_invalid_option(path, monkeypatch):
    q, k, v = make_qkv(1, 4, 4, 2, 2, 8)
    with pytest.raises(InvalidOption) as err:
        attnkit.attend(q, k, v, "softmax", pattern="causal_self", path=path)
    msg = str(err.value)
    assert repr(path) in msg and "auto, reference, sdpa" in msg, msg
    monkeypatch.setenv("ATTNKIT_PATH", "reference")  # the environment does not hide a malformed argument
    with pytest.raises(InvalidOption):
        attnkit.attend(q, k, v, "softmax", pattern="causal_self", path=path)
