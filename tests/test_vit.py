"""attnkit.nn.ViT and HierarchicalViT: shapes, gradients, pooling, the grid each attention call is told, errors,
and the digits quality task on the ViT for spatial mechanisms."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.bench import quality
from attnkit.bench.case import Budget
from attnkit.bench.quality import GreyLevelViT, QualityCase
from attnkit.bench.tasks import get_task
from attnkit.errors import DTypeError, InvalidOption, ShapeError, UnknownMechanism, UnsupportedPattern
from attnkit.mechanism import REGISTRY, Complexity, Mechanism, Paper, register_mechanism
from attnkit.nn import EncoderClassifier, HierarchicalViT, ViT
from attnkit.nn.vit import PatchMerging
from attnkit.ops.spatial import from_grid, to_grid
from attnkit.patterns import Pattern

SEEN: list[tuple[int, ...] | None] = []  # the spatial_shape of every call of the test mechanisms, in order


class _RowAttention(Mechanism):
    """Softmax attention within each row of the grid (a toy axial attention): it needs ``spatial_shape``."""

    family = "test"
    paper = Paper("none", 2026)
    patterns = frozenset({Pattern.NONCAUSAL_SELF})
    exact = False
    spatial = True
    complexity = Complexity("O(T·w)", "O(T)")

    def reference(self, x):
        SEEN.append(x.spatial_shape)
        h, w = x.spatial_shape
        k, v = (t.repeat_interleave(x.groups, 2) for t in (x.k, x.v))
        rows = [to_grid(t, (h, w)).permute(0, 1, 3, 2, 4) for t in (x.q, k, v)]  # [B, h, H, w, D]
        out = F.scaled_dot_product_attention(*rows, scale=x.scale)  # each row attends within itself
        return from_grid(out.permute(0, 1, 3, 2, 4)), None

    def flops(self, shape, pattern):
        return 0.0


class _Recorder(_RowAttention):
    """Plain softmax attention over all tokens (not spatial) that records the spatial_shape it is given."""

    spatial = False

    def reference(self, x):
        SEEN.append(x.spatial_shape)
        k, v = (t.repeat_interleave(x.groups, 2).transpose(1, 2) for t in (x.k, x.v))
        return F.scaled_dot_product_attention(x.q.transpose(1, 2), k, v, scale=x.scale).transpose(1, 2), None


@pytest.fixture
def grid_mechanisms():
    """``_test_rows`` (spatial) and ``_test_recorder`` (not spatial), registered for one test, then removed."""
    register_mechanism("_test_rows")(_RowAttention)
    register_mechanism("_test_recorder")(_Recorder)
    SEEN.clear()
    try:
        yield "_test_rows", "_test_recorder"
    finally:
        for name in ("_test_rows", "_test_recorder"):
            REGISTRY._entries.pop(name, None)
        SEEN.clear()


def _check_gradients(model: torch.nn.Module, out: torch.Tensor) -> None:
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_vit_with_softmax_shapes_and_gradients(pooling):
    torch.manual_seed(0)
    model = ViT((12, 16), 4, 3, 7, dim=16, depth=2, heads=2, pooling=pooling)  # non-square: a 3 × 4 grid
    assert model.grid == (3, 4)
    tokens = model.features(torch.randn(2, 3, 12, 16))
    assert tokens.shape == (2, 12 + (pooling == "cls"), 16)
    logits = model(torch.randn(2, 3, 12, 16))
    assert logits.shape == (2, 7)
    _check_gradients(model, logits)


def test_cls_and_mean_pool_different_tokens():
    torch.manual_seed(0)
    cls = ViT(8, 2, 1, 4, dim=16, depth=1, heads=2, pooling="cls")
    mean = ViT(8, 2, 1, 4, dim=16, depth=1, heads=2, pooling="mean")
    images = torch.randn(3, 1, 8, 8)
    feats = cls.features(images)
    assert torch.allclose(cls(images), cls.head(feats[:, 0]))
    feats = mean.features(images)
    assert torch.allclose(mean(images), mean.head(feats.mean(dim=1)), atol=1e-6)


def test_a_spatial_mechanism_gets_the_patch_grid_on_every_call(grid_mechanisms):
    rows, _ = grid_mechanisms
    torch.manual_seed(0)
    model = ViT((12, 20), (3, 4), 2, 5, dim=16, depth=3, heads=2, mechanism=rows, pooling="mean")
    logits = model(torch.randn(2, 2, 12, 20))
    assert logits.shape == (2, 5)
    assert SEEN == [(4, 5)] * 3  # every block, the (H/p_h, W/p_w) grid
    _check_gradients(model, logits)


def test_the_grid_reaches_any_mechanism_when_the_tokens_are_the_grid(grid_mechanisms):
    _, recorder = grid_mechanisms
    ViT(8, 2, 1, 3, dim=16, depth=2, heads=2, mechanism=recorder, pooling="mean")(torch.randn(1, 1, 8, 8))
    assert SEEN == [(4, 4), (4, 4)]
    SEEN.clear()
    ViT(8, 2, 1, 3, dim=16, depth=2, heads=2, mechanism=recorder, pooling="cls")(torch.randn(1, 1, 8, 8))
    assert SEEN == [None, None]  # a class token first: the tokens are no grid


def test_a_spatial_mechanism_refuses_the_class_token(grid_mechanisms):
    rows, _ = grid_mechanisms
    with pytest.raises(InvalidOption, match="spatial.*pooling='mean'"):
        ViT(8, 2, 1, 3, dim=16, depth=1, heads=2, mechanism=rows, pooling="cls")
    with pytest.raises(InvalidOption, match="pooling='mean'"):
        ViT(8, 2, 1, 3, dim=16, depth=1, heads=2, mechanism=rows)  # "cls" is the default


def test_vit_construction_errors():
    with pytest.raises(ShapeError, match=r"\(30, 32\) is not divisible by patch_size \(4, 4\)"):
        ViT((30, 32), 4, 3, 10, dim=16, depth=1, heads=2)
    with pytest.raises(InvalidOption, match="pooling='max'; expected one of cls, mean"):
        ViT(8, 2, 1, 3, pooling="max")
    with pytest.raises(InvalidOption, match="positions='rope'; expected one of learned, none"):
        ViT(8, 2, 1, 3, positions="rope")
    with pytest.raises(InvalidOption, match="patch_size"):
        ViT(8, 0, 1, 3)
    with pytest.raises(InvalidOption, match="image_size"):
        ViT((8, 8, 8), 2, 1, 3)
    with pytest.raises(UnknownMechanism):
        ViT(8, 2, 1, 3, mechanism="softmaxx")
    with pytest.raises(UnsupportedPattern, match="ViT needs pattern noncausal_self"):
        ViT(8, 2, 1, 3, mechanism="aaren")  # causal only
    with pytest.raises(InvalidOption, match="window"):
        ViT(8, 2, 1, 3, mechanism="softmax", window=3)  # an option softmax does not have


def test_vit_input_errors():
    model = ViT((8, 12), 4, 3, 5, dim=16, depth=1, heads=2)
    with pytest.raises(ShapeError, match=r"images must be \[B, 3, 8, 12\]; got shape \(2, 3, 12, 8\)"):
        model(torch.randn(2, 3, 12, 8))
    with pytest.raises(ShapeError, match=r"\[B, 3, 8, 12\]"):
        model(torch.randn(2, 1, 8, 12))
    with pytest.raises(ShapeError):
        model(torch.randn(3, 8, 12))
    with pytest.raises(DTypeError, match="float64"):
        model(torch.randn(2, 3, 8, 12, dtype=torch.float64))
    with pytest.raises(DTypeError, match="torch.Tensor"):
        model([[0.0]])


def test_hierarchical_vit_stage_shapes_and_grids(grid_mechanisms):
    rows, _ = grid_mechanisms
    torch.manual_seed(0)
    model = HierarchicalViT(14, 2, 3, 6, depths=(2, 1, 1), dims=(8, 16, 32), heads=(2, 2, 4), mechanism=rows)
    assert model.stage_shapes == ((7, 7), (4, 4), (2, 2))  # odd 7 is padded to 8 before merging
    outs = model.stage_outputs(torch.randn(2, 3, 14, 14))
    assert [tuple(o.shape) for o in outs] == [(2, 49, 8), (2, 16, 16), (2, 4, 32)]
    assert SEEN == [(7, 7), (7, 7), (4, 4), (2, 2)]  # each stage tells its own grid
    logits = model(torch.randn(2, 3, 14, 14))
    assert logits.shape == (2, 6)
    _check_gradients(model, logits)


def test_hierarchical_vit_with_softmax_non_square():
    model = HierarchicalViT((8, 12), 2, 1, 3, depths=(1, 1), dims=(8, 16), heads=2)
    assert model.stage_shapes == ((4, 6), (2, 3))
    assert model(torch.randn(2, 1, 8, 12)).shape == (2, 3)


def test_hierarchical_vit_errors():
    with pytest.raises(InvalidOption, match="dims needs one value per stage"):
        HierarchicalViT(8, 2, 1, 3, depths=(1, 1), dims=(8,))
    with pytest.raises(InvalidOption, match="heads needs one value per stage"):
        HierarchicalViT(8, 2, 1, 3, depths=(1, 1), dims=(8, 16), heads=(2, 2, 2))
    with pytest.raises(InvalidOption, match="depths must be a non-empty sequence"):
        HierarchicalViT(8, 2, 1, 3, depths=())
    with pytest.raises(InvalidOption, match="depth"):
        HierarchicalViT(8, 2, 1, 3, depths=(1, 0), dims=(8, 16))
    with pytest.raises(ShapeError, match="not divisible"):
        HierarchicalViT(9, 2, 1, 3)


def test_patch_merging_takes_swins_neighbours_and_pads_odd_sides_with_zeros():
    merge = PatchMerging(1, 4)
    merge.norm = torch.nn.Identity()  # look at what is concatenated
    with torch.no_grad():
        merge.reduction.weight.copy_(torch.eye(4))
    x = torch.arange(1.0, 10.0).view(1, 9, 1)  # a 3 × 3 grid holding 1..9, row-major
    out = merge(x, (3, 3))  # [1, 2·2, 4]
    # cell (r, c) holds grid[2r, 2c], grid[2r+1, 2c], grid[2r, 2c+1], grid[2r+1, 2c+1]; outside the grid: 0
    assert out[0].tolist() == [[1, 4, 2, 5], [3, 6, 0, 0], [7, 0, 8, 0], [9, 0, 0, 0]]


def test_the_grey_level_vit_embeds_each_level_as_the_encoder_does():
    model = GreyLevelViT(17, (4, 4), 10, dim=8, depth=1, heads=2)
    pixels = torch.randint(0, 17, (2, 16))
    tokens = model.vit.patches(F.one_hot(pixels, 17).float().view(2, 4, 4, 17).permute(0, 3, 1, 2))
    weight = model.vit.patches.proj.weight[:, :, 0, 0]  # [dim, levels]: one vector per grey level
    assert torch.allclose(tokens, weight.T[pixels])  # the bias starts at zero
    assert model(pixels).shape == (2, 10)
    with pytest.raises(InvalidOption, match="0..16"):
        model(torch.full((2, 16), 17))
    with pytest.raises(InvalidOption, match=r"\[B, 16\]"):
        model(torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(InvalidOption, match="padded"):
        model(pixels, key_padding_mask=torch.ones(2, 16, dtype=torch.bool))


@pytest.fixture
def tiny_digits(monkeypatch):
    """The digits task's quick preset, cut to a few steps and images (a smoke run through the quality API)."""
    presets = dict(type(get_task("digits")).presets)
    presets["quick"] = dataclasses.replace(presets["quick"], n_train=64, n_test=32, steps=3, batch_size=16)
    monkeypatch.setattr(type(get_task("digits")), "presets", presets)


def test_digits_trains_a_vit_for_a_spatial_mechanism(grid_mechanisms, tiny_digits, monkeypatch):
    rows, _ = grid_mechanisms
    built = []
    real = quality.build_model
    monkeypatch.setattr(quality, "build_model", lambda *a: built.append(real(*a)) or built[-1])
    case = QualityCase("digits", rows, "quick")
    result = case.measure(threads=1, budget=Budget())
    assert result["status"] == "ok" and 0.0 <= result["score"] <= 1.0
    assert result["extra"]["backbone"] == "ViT, 1x1 patches"
    (model,) = built
    assert isinstance(model, GreyLevelViT) and isinstance(model.vit, ViT) and model.vit.grid == (8, 8)
    assert SEEN and set(SEEN) == {(8, 8)}  # the quick preset's 8 × 8 images, one token per pixel


def test_digits_keeps_the_pixel_sequence_encoder_for_other_mechanisms():
    case = QualityCase("digits", "softmax", "quick")
    task = case._task
    model = quality.build_model(case, task, task.preset("quick").vocab, 64)
    assert isinstance(model, EncoderClassifier)
    assert "backbone" not in case.row()["extra"]  # the stored rows of every non-spatial mechanism are as before


def test_a_spatial_mechanism_on_a_sequence_task_or_with_rope_is_not_applicable(grid_mechanisms):
    rows, _ = grid_mechanisms
    result = QualityCase("listops", rows, "quick").measure(threads=1, budget=Budget())
    assert result["status"] == "not_applicable" and "a sequence" in result["reason"]
    result = QualityCase("digits", rows, "quick", positions="rope").measure(threads=1, budget=Budget())
    assert result["status"] == "not_applicable" and "not rope" in result["reason"]
    assert SEEN == []  # nothing trained


def test_vit_is_exported():
    assert attnkit.nn.ViT is ViT and attnkit.nn.HierarchicalViT is HierarchicalViT
