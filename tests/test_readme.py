"""The README's examples run as written, and its catalogue is the live ``attnkit list``."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit.cli import main
from attnkit.mechanism import REGISTRY, Shape
from attnkit.options import option_docs
from attnkit.testing import Case, make_qkv, pattern_path_grid

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    """The README's text from the heading ``## title`` to the next ``## `` heading."""
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert found, f"README has no section '## {title}'"
    return found.group(1)


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], str(README), "exec"), scope)  # noqa: S102 - our own README
    assert scope["y"].shape == (2, 100, 512)
    assert scope["o"].shape == scope["q"].shape
    assert scope["loss"].ndim == 0 and scope["loss"].requires_grad


def test_readme_backbone_example_runs():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Quality: small models") :]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    scope: dict = {}
    exec(compile(block, str(README), "exec"), scope)  # noqa: S102 - our own README
    assert scope["logits"].shape == (8, 64, 128)


def test_readme_catalogue_is_the_live_attnkit_list(capsys):
    """The table under 'What is in it' is exactly what `attnkit list` prints now (it cannot go stale)."""
    blocks = re.findall(r"```\n(.*?)```", _section("What is in it: `attnkit list`"), flags=re.S)
    assert len(blocks) == 1, "the catalogue section holds one plain code block"
    assert main(["list"]) == 0
    live = capsys.readouterr().out
    assert blocks[0] == live, "README's catalogue is stale: paste the output of `attnkit list` into it"


@pytest.fixture
def readme_mechanism(tmp_path):
    """The 'Adding a mechanism' example, saved as a file and imported (it registers itself); removed after."""
    blocks = re.findall(r"```python\n(.*?)```", _section("Adding a mechanism"), flags=re.S)
    assert len(blocks) == 1, "the section holds one python example"
    before = set(REGISTRY.names())
    path = tmp_path / "readme_mechanism.py"
    path.write_text(blocks[0], encoding="utf-8")
    spec = importlib.util.spec_from_file_location("readme_mechanism", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_mechanism"] = module
    try:
        spec.loader.exec_module(module)
        added = set(REGISTRY.names()) - before
        assert len(added) == 1, f"the example registers one mechanism; it registered {sorted(added)}"
        yield added.pop()
    finally:
        sys.modules.pop("readme_mechanism", None)
        for name in set(REGISTRY.names()) - before:
            REGISTRY._entries.pop(name)


def test_readme_adding_a_mechanism_example_registers_and_passes_a_quick_check(readme_mechanism):
    """The example passes the conformance suite's checks on small shapes, and appears in the catalogue."""
    import test_conformance as conformance  # the suite's own checks, run on the new mechanism

    name = readme_mechanism
    info = attnkit.info(name)
    assert info.paths and info.supports_state and name in {i.name for i in attnkit.mechanisms()}
    assert "tau" in option_docs(info.options)  # `attnkit info` shows what each option means
    case = Case(name)
    grid = pattern_path_grid([case])
    assert {pattern for _, pattern, _ in grid} == set(info.patterns)
    for item in grid:
        conformance.test_fast_path_matches_reference(item, torch.float32, 1)
        conformance.test_pattern_contract(item)
        conformance.test_key_padding(item)
        conformance.test_gqa_equals_repeated_kv(item)
    conformance.test_unsupported_patterns_raise(case)
    conformance.test_bad_inputs_raise_clear_errors(case)
    conformance.test_chunked_state_equals_full_call((case, grid[0][2]), masked=True, autograd=False)
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16)
    out, state = attnkit.attend(q, k, v, name, pattern="causal_self", return_state=True)
    assert out.shape == q.shape and state.offset == 8
    assert attnkit.create(name).flops(Shape(1, 8, 8, 2, 2, 16, 16), attnkit.Pattern.CAUSAL_SELF) > 0
