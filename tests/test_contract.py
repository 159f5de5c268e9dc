"""The mechanism contract (DESIGN §2), checked over the registry and the source tree.

Every mechanism has its own FLOP formula; no mechanism file imports another mechanism; the modules
import each other without circles; ``path="auto"`` says when it falls back to the reference.
"""

from __future__ import annotations

import ast
import math
import warnings
from pathlib import Path

import pytest

import attnkit
from attnkit import AttnkitError, Pattern
from attnkit.errors import ReferenceFallbackWarning
from attnkit.mechanism import REGISTRY, Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from attnkit.testing import make_qkv

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


# ---- no mechanism imports another --------------------------------------------------------------------

SRC = Path(attnkit.__file__).resolve().parent


def _imported_modules(path: Path, package: str) -> set[str]:
    """Dotted names of the attnkit modules a file imports (relative imports resolved), anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)  # `from . import softmax`
    return names


MECHANISM_FILES = sorted((SRC / "mechanisms").glob("*.py"))


@pytest.mark.parametrize("path", MECHANISM_FILES, ids=lambda p: p.name)
def test_no_mechanism_imports_another(path):
    """Shared pieces live in ops/ (or a private _base module); a mechanism file never imports another."""
    mechanisms = {f"attnkit.mechanisms.{p.stem}" for p in MECHANISM_FILES if not p.stem.startswith("_")}
    imported = _imported_modules(path, "attnkit.mechanisms")
    assert not imported & mechanisms, f"{path.name} imports {sorted(imported & mechanisms)}"


# ---- no import circles -------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported, and those under ``if TYPE_CHECKING:`` (a circle hidden
    from the interpreter is still a circle); not the ones inside functions (deliberately lazy)."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If | ast.Try):
            todo.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            todo.extend(n for h in getattr(node, "handlers", []) for n in h.body)
    return found


def _import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        module = ast.Module(body=_top_level_imports(ast.parse(path.read_text(encoding="utf-8"))), type_ignores=[])
        graph[name] = {m for m in _imported_modules_of(module, package, set(files)) if m in files and m != name}
    return graph


def _imported_modules_of(tree: ast.Module, package: str, files: set[str]) -> set[str]:
    """``from . import sections`` imports the submodule, not the package's ``__init__`` again."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        else:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            module = ".".join(x for x in (base, node.module) if x)
            submodules = {f"{module}.{a.name}" for a in node.names} & files
            names.update(submodules)
            if len(submodules) < len(node.names):
                names.add(module)
    return names


def test_no_import_circles():
    """No module imports (at import time or for type checking) one that imports it back, directly or not."""
    graph = _import_graph()
    assert graph["attnkit.mechanism"] and "attnkit.inputs" in graph["attnkit.mechanism"]  # the graph is read
    circles = []
    for start in sorted(graph):
        seen, todo = set(), [(start, [start])]
        while todo:
            node, trail = todo.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    circles.append(" -> ".join([*trail, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    todo.append((nxt, [*trail, nxt]))
    assert not circles, "import circles:\n" + "\n".join(circles)


# ---- path="auto" says when it falls back to the reference ------------------------------------------


@pytest.fixture
def picky_mechanism():
    """A throwaway mechanism whose one fast path takes only inputs of at most 4 queries."""

    class Picky(Mechanism):
        family = "test"
        paper = Paper("none", 2026)
        patterns = frozenset(Pattern)
        exact = True
        complexity = Complexity("O(1)", "O(1)")

        def reference(self, x):
            return x.v.repeat_interleave(x.groups, 2)[:, : x.tq].clone(), None

        @fast_path("small", priority=10)
        def small(self, x):
            return self.reference(x)

        @small.unsupported
        def _small_reasons(self, x):
            return [f"small takes Tq <= 4; got Tq={x.tq}"] if x.tq > 4 else []

        def flops(self, shape, pattern):
            return 1.0

    register_mechanism("_test_picky")(Picky)
    yield "_test_picky"
    REGISTRY._entries.pop("_test_picky")


def test_auto_warns_once_when_it_falls_back_to_the_reference(picky_mechanism, monkeypatch):
    mech = attnkit.create(picky_mechanism)
    q, k, v = make_qkv(1, 6, 6, 2, 2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the once-only is attnkit's own, not the warnings registry's
        mech(q[:, :3], k[:, :3], v[:, :3], pattern="causal_self")  # the fast path takes it: no warning
        assert mech.last_path == "small" and not caught
        for _ in range(3):
            mech(q, k, v, pattern="causal_self")
        assert mech.last_path == "reference"
        assert len(caught) == 1, [str(w.message) for w in caught]
        w = caught[0]
        assert issubclass(w.category, ReferenceFallbackWarning) and issubclass(w.category, UserWarning)
        msg = str(w.message)
        assert picky_mechanism in msg and "small" in msg and "Tq <= 4; got Tq=6" in msg and "reference" in msg
        mech(q[:, :5], k[:, :5], v[:, :5], pattern="causal_self")  # another reason: warned once more
        assert len(caught) == 2 and "Tq=5" in str(caught[1].message)
        mech(q[:, :5], k[:, :5], v[:, :5], pattern="causal_self")
        mech(q[:, :5], k[:, :5], v[:, :5], pattern="causal_self", path="reference")  # asked for: no warning
        monkeypatch.setenv("ATTNKIT_PATH", "reference")
        mech(q[:, :5], k[:, :4], v[:, :4], pattern="noncausal_cross")
        assert len(caught) == 2


def test_reference_only_mechanisms_do_not_warn(picky_mechanism):
    """A mechanism without fast paths runs its reference by design: nothing to warn about."""
    q, k, v = make_qkv(1, 6, 6, 2, 2, 8)
    mech = attnkit.create(picky_mechanism)
    type(mech)._fast_paths, saved = (), type(mech)._fast_paths
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mech(q, k, v, pattern="causal_self")
    finally:
        type(mech)._fast_paths = saved
