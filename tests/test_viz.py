"""attnkit.viz, `attnkit viz` and the report's catalogue: weights read out with one-hot values, drawn as PNGs."""

from __future__ import annotations

import base64
import math
import re
import struct
from dataclasses import dataclass

import pytest
import torch

import attnkit
from attnkit import viz
from attnkit.bench.store import Store
from attnkit.cli import main
from attnkit.cli.viz import parse_value
from attnkit.errors import InvalidOption, ShapeError, UnknownMechanism, UnsupportedPattern
from attnkit.mechanism import REGISTRY, Complexity, Mechanism, Paper, register_mechanism
from attnkit.ops.reference import upcast_qkv
from attnkit.patterns import ALL_PATTERNS
from attnkit.report import build_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, read from its IHDR chunk (asserting the signature first)."""
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def distances(n: int) -> torch.Tensor:
    """``[T, T]``: i - j (query minus key)."""
    pos = torch.arange(n)
    return pos[:, None] - pos[None, :]


# ---- the weights ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self"])
def test_sliding_window_weights_are_exactly_its_band(pattern):
    n, window = 40, 5
    w = viz.weights("sliding_window", length=n, pattern=pattern, window=window)
    d = distances(n)
    band = (d.abs() < window) if pattern == "noncausal_self" else ((d >= 0) & (d < window))
    assert w.shape == (n, n)
    assert torch.all(w[~band] == 0), "a key outside the band got weight"
    assert torch.all(w[band] > 0), "a key inside the band got none"
    torch.testing.assert_close(w.sum(-1), torch.ones(n), atol=1e-5, rtol=0)


def test_softmax_rows_equal_softmax_of_the_scores_computed_directly():
    n, heads, head_dim, seed, head = 30, 4, 16, 7, 2
    w = viz.weights("softmax", length=n, seed=seed, head=head, heads=heads, head_dim=head_dim)
    q, k = viz.random_qk(n, heads, head_dim, seed)
    expected = torch.softmax(q[0, :, head] @ k[0, :, head].T / math.sqrt(head_dim), dim=-1)
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.ones(n), atol=1e-5, rtol=0)


def test_dilated_shows_its_strides():
    n, r, window = 48, 3, 2
    w = viz.weights("dilated", length=n, dilation=r, window=window)
    d = distances(n)
    seen = (d % r == 0) & (d.abs() <= window * r)
    assert torch.all(w[~seen] == 0) and torch.all(w[seen] > 0)
    # heterogeneous heads (S2-Attention): head h reads the keys j = h mod r
    for head in (1, 2):
        w = viz.weights("dilated", length=n, dilation=r, heterogeneous=True, head=head)
        cols = (w != 0).any(0)
        assert torch.equal(cols, torch.arange(n) % r == head % r), head


def test_every_path_gives_the_same_weights():
    for path in ["reference", *attnkit.info("sliding_window").paths]:
        w = viz.weights("sliding_window", length=24, window=4, path=path)
        ref = viz.weights("sliding_window", length=24, window=4, path="reference")
        torch.testing.assert_close(w, ref, atol=1e-6, rtol=1e-5, msg=path)


def test_trainable_mechanisms_draw_from_the_seed_and_leave_the_global_rng_alone():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    a = viz.weights("hedgehog", length=16, seed=3)
    assert torch.equal(torch.rand(3), expected), "viz changed the global random state"
    assert torch.equal(a, viz.weights("hedgehog", length=16, seed=3))
    assert not torch.equal(a, viz.weights("hedgehog", length=16, seed=4))


def test_a_built_module_is_drawn_as_it_is_and_keeps_its_mode():
    mech = attnkit.create("hedgehog", heads=2, head_dim=8)
    w = viz.weights(mech, length=12, head=1)
    assert w.shape == (12, 12) and mech.training, "viz left the caller's module in eval mode"
    with pytest.raises(InvalidOption, match="expected 0..1"):
        viz.weights(mech, length=12, head=2)


def test_an_option_named_like_a_keyword_goes_in_options():
    a = viz.weights("routing", length=32, options={"seed": 1, "num_clusters": 4})
    b = viz.weights("routing", length=32, options={"seed": 2, "num_clusters": 4})
    assert a.shape == b.shape == (32, 32)
    with pytest.raises(InvalidOption, match="both as keywords and in options"):
        viz.weights("routing", options={"num_clusters": 4}, num_clusters=4)


# ---- refusals: typed errors, before any compute -----------------------------------------------------------------


@dataclass(frozen=True)
class _NoOptions:
    pass


def _define(name: str, **attrs):
    """A tiny softmax-like test mechanism whose values pass through ``attrs['values']`` (v -> f(v))."""
    values = attrs.pop("values")

    class Tiny(Mechanism):
        family = "test"
        paper = Paper("a test mechanism", 2025, "0000.00000")
        patterns = ALL_PATTERNS
        exact = False
        complexity = Complexity("O(T^2)", "O(T^2)")
        Options = _NoOptions

        def reference(self, x):
            q, k, v = upcast_qkv(x)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * x.scale  # [B, H, Tq, Tk]
            out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), values(v))
            return out.to(x.q.dtype), None

        def flops(self, shape, pattern):
            return 0.0

    for key, value in attrs.items():
        setattr(Tiny, key, value)
    return register_mechanism(name)(Tiny)


@pytest.fixture
def registered():
    """Register test mechanisms with ``registered(name, values=..., **attrs)``; removed after the test."""
    before = set(REGISTRY.names())
    yield _define
    for name in set(REGISTRY.names()) - before:
        REGISTRY._entries.pop(name)


def test_a_mechanism_not_affine_in_v_is_refused(registered):
    registered("viz_test_squares", values=lambda v: v * v.abs())
    with pytest.raises(InvalidOption, match="not linear in v"):
        viz.weights("viz_test_squares", length=16)
    registered("viz_test_affine", values=lambda v: v + 1)  # affine (a bias after the values): its offset is removed
    torch.testing.assert_close(viz.weights("viz_test_affine", length=16).sum(-1), torch.full((16,), 1.0))
    registered("viz_test_linear", values=lambda v: 2 * v)  # linear: drawn
    torch.testing.assert_close(viz.weights("viz_test_linear", length=16).sum(-1), torch.full((16,), 2.0))


def test_a_mixer_is_refused(registered):
    registered("viz_test_mixer", values=lambda v: v, kind="mixer")
    with pytest.raises(InvalidOption, match="token mixer"):
        viz.weights("viz_test_mixer", length=16)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (dict(mechanism="softmx"), UnknownMechanism, "Did you mean 'softmax'"),
        (dict(mechanism="aaren", pattern="noncausal_self"), UnsupportedPattern, "supports causal_self"),
        (dict(length=50, spatial_shape=(7, 7)), ShapeError, "49 positions but length=50"),
        (dict(spatial_shape=(7, 0)), ShapeError, "positive integer sizes"),
        (dict(spatial_shape=(2, 2, 2, 2)), ShapeError, "1 to 3"),
        (dict(spatial_shape=7), ShapeError, "not a tuple"),
        (dict(length=0), InvalidOption, "positive integer"),
        (dict(length=5000), InvalidOption, "at most 4096"),
        (dict(head=4), InvalidOption, "expected 0..3"),
        (dict(head=-1), InvalidOption, "expected 0..3"),
        (dict(query=64), InvalidOption, "outside the 64 tokens"),
        (dict(query=(3, 5)), InvalidOption, "no spatial_shape"),
        (dict(spatial_shape=(14, 14), query=(3, 14)), InvalidOption, "not a cell of the 14x14 grid"),
        (dict(spatial_shape=(14, 14), query=(3, 5, 1)), InvalidOption, "expected 2 coordinates"),
        (dict(query="middle"), InvalidOption, "token index or grid coordinates"),
        (dict(mechanism="sliding_window", windw=3), InvalidOption, "Did you mean 'window'"),
        (dict(mechanism=attnkit.create("softmax"), window=3), InvalidOption, "a module has its own"),
    ],
)
def test_bad_inputs_raise_typed_errors_before_any_compute(monkeypatch, call, error, match):
    def no_compute(*args, **kwargs):
        raise AssertionError("ran the mechanism before refusing the inputs")

    monkeypatch.setattr(viz, "_run", no_compute)
    call = {"mechanism": "softmax", **call}
    with pytest.raises(error, match=match):
        viz.pattern_figure(call.pop("mechanism"), **call)


# ---- pictures -------------------------------------------------------------------------------------------------


def test_queries_are_indices_or_row_major_cells():
    assert viz.resolve_query(None, 64, None) == 32
    assert viz.resolve_query(17, 64, None) == 17
    assert viz.resolve_query((3, 5), 196, (14, 14)) == 3 * 14 + 5
    assert viz.resolve_query(None, 196, (14, 14)) == 7 * 14 + 7
    assert viz.resolve_query((1, 2, 3), 3 * 4 * 5, (3, 4, 5)) == (1 * 4 + 2) * 5 + 3


def test_a_3d_grid_draws_one_panel_per_depth_slice():
    fig = viz.pattern_figure("softmax", spatial_shape=(3, 4, 5), query=(1, 2, 3))
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["depth 0", "depth 1", "depth 2"]
    marked = [ax.get_title() for ax in fig.axes if ax.patches]
    assert marked == ["depth 1"], "the query's cell is marked on its own slice only"


def test_signed_weights_get_a_diverging_scale_and_log_shows_magnitudes():
    w = torch.tensor([[0.5, -0.25], [0.0, 1.0]])
    values, cmap, norm, label = viz.colour_scale(w)
    assert label == "weight (signed)" and norm.vmin == -1.0 and norm.vmax == 1.0
    assert math.isnan(values[1, 0]), "a weight of exactly 0 (a key not seen) is drawn blank"
    values, _, norm, label = viz.colour_scale(w, log_scale=True)
    assert label == "|weight| (log)" and values[0, 1] == 0.25


def test_save_pattern_writes_pngs(tmp_path):
    one_d = viz.save_pattern("sliding_window", tmp_path / "a" / "band.png", query=5, window=4, length=32)
    assert png_size(one_d.read_bytes()) == (640, 720)
    grid = viz.save_pattern("softmax", tmp_path / "grid.png", spatial_shape=(14, 14), query=(3, 5), log_scale=True)
    width, height = png_size(grid.read_bytes())
    assert width > 100 and height > 100


# ---- the command ----------------------------------------------------------------------------------------------


def test_cli_writes_a_png_to_a_path_with_a_space_and_a_hash(tmp_path, capsys):
    out = tmp_path / "my pictures" / "window #1.png"
    code = main(["viz", "sliding_window", "--option", "window=4", "--length", "32", "--query", "17", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and printed.strip() == f"wrote {out.resolve()}"
    assert png_size(out.read_bytes()) == (640, 720)
    out = tmp_path / "grid #2.png"
    assert main(["viz", "softmax", "--spatial-shape", "14x14", "--query", "3,5", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_cli_default_pattern_and_file_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["viz", "aaren", "--length", "16"]) == 0  # aaren has causal_self only
    assert (tmp_path / "aaren-causal_self.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    "argv, message",
    [
        (["viz", "softmax", "--query", "3,5"], "no spatial_shape"),
        (["viz", "softmax", "--option", "window"], "is not NAME=VALUE"),
        (["viz", "sliding_window", "--option", "window=4", "--option", "window=5"], "given twice"),
        (["viz", "softmax", "--head", "9"], "expected 0..3"),
        (["viz", "sliding_window", "--option", "window=x"], "window='x' is not valid"),
    ],
)
def test_cli_bad_inputs_are_clear_errors(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "x.png")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv", [["--spatial-shape", "14"], ["--spatial-shape", "14x0"], ["--query", "a,b"],
                                  ["--length", "8", "--spatial-shape", "2x4"]])  # fmt: skip
def test_cli_refuses_malformed_arguments(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(["viz", "softmax", *argv])
    assert exit_.value.code == 2 and "attnkit viz: error" in capsys.readouterr().err


def test_cli_option_values_parse():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("-2") == -2
    assert parse_value("true") is True and parse_value("False") is False and parse_value("None") is None
    assert parse_value("relu") == "relu" and parse_value("7,7") == (7, 7) and parse_value("true,false") == (True, False)


def test_cli_help_explains(capsys):
    with pytest.raises(SystemExit):
        main(["viz", "--help"])
    text = capsys.readouterr().out
    for words in ("one-hot", "--spatial-shape", "--query", "--option", "row-major", "examples:"):
        assert words in text


# ---- the report's catalogue ---------------------------------------------------------------------------------------


def test_the_report_has_a_thumbnail_per_attention_mechanism(tmp_path, registered):
    registered("viz_test_squares", values=lambda v: v * v.abs())  # cannot be drawn: a note, not a crash
    with Store(tmp_path / "empty.sqlite"):
        pass
    html = build_report(tmp_path / "empty.sqlite", tmp_path / "report.html").read_text()
    section = re.search(r'<section id="catalogue">.*?</section>', html, re.S).group(0)
    figures = re.findall(r'<figure class="thumb" data-mechanism="([^"]+)">(.*?)</figure>', section, re.S)
    names = [i.name for i in attnkit.mechanisms(kind="attention")]
    assert [n for n, _ in figures] == names
    drawn = 0
    for name, body in figures:
        image = re.search(r'src="data:image/png;base64,([^"]+)"', body)
        if name == "viz_test_squares":
            assert image is None and "not drawn" in body and "not linear in v" in body
            continue
        if image:
            width, height = png_size(base64.b64decode(image.group(1)))
            assert (width, height) in ((48 * 3, 48 * 3), (14 * 3, 14 * 3)), name
            drawn += 1
        info = attnkit.info(name)
        assert info.family in body and " ".join(p.short for p in attnkit.Pattern if p in info.patterns) in body
    # all but those not affine in v: channel (a softmax of k and v), dynamic_mask (keys chosen by v), rat (gates)
    assert drawn >= len(names) - 1 - 3, "most mechanisms draw (those not affine in v get a note)"  # 1: the test one
    assert "http" not in section, "the thumbnails need no network"
