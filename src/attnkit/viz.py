"""Seeing the pattern: which keys each query of a mechanism sees, and with what weight, drawn with matplotlib.

Every attention mechanism here is linear in v: ``out = A(q, k) v`` (a few add a term that is also linear in
v, such as agent attention's depthwise convolution). Feeding one-hot values therefore reads the weights out
of any mechanism and any path without touching its code: with ``v[j] = e_(j mod D)`` for the keys of one
slice of ``D = head_dim`` keys, ``out[i, c]`` is the weight of key ``c`` of that slice for query ``i``.
The slices run as one batch (q and k repeated) and are stacked into ``[Tq, Tk]``.

What the picture shows: the pattern on **random** inputs (q, k drawn from ``seed``; a trainable
mechanism's parameters initialised from the same seed). A content-dependent mechanism (routing,
reformer, sea, bilevel_routing, dynamic_mask, ...) routes by q and k, so its picture is one draw: another
seed shows other keys. A term that acts per channel (a depthwise convolution over v) is read on the
channel each key lands on, ``j mod head_dim``.

An affine term (a bias added after a convolution of v, as in CSWin's LePE) is allowed: the output at
``v = 0`` is subtracted from every read-out. A mechanism that is *not* affine in v would be drawn wrong, so
before drawing this is checked on a random pair: ``out(v1 + v2) + out(0) == out(v1) + out(v2)``; a mechanism
that fails (channel attention mixes channels by a softmax of k and v; dynamic_mask selects keys by their
values) is refused with :class:`~attnkit.errors.InvalidOption`. Token mixers (``kind="mixer"``) have no
attention weights and are refused too.
"""

from __future__ import annotations

import base64
import io
import logging
import math
from pathlib import Path
from typing import Any

import torch

from .errors import AttnkitError, InvalidOption, ShapeError, UnsupportedPattern
from .mechanism import REGISTRY, Mechanism
from .patterns import Pattern, as_pattern

log = logging.getLogger(__name__)

DEFAULT_LENGTH = 64  # tokens of a 1-D picture when no length is given
DEFAULT_SPATIAL_SHAPE = (14, 14)  # grid of a spatial mechanism's picture when no spatial_shape is given
MAX_TOKENS = 4096  # the picture holds a [T, T] matrix; beyond this it is neither fast nor readable
DEFAULT_HEADS = 4  # enough for mechanisms that treat heads differently (dilated shards, split heads)
DEFAULT_HEAD_DIM = 16
LINEARITY_TOL = 1e-3  # relative: ||out(v1+v2) - out(v1) - out(v2)|| / (||out(v1)|| + ||out(v2)||)
CMAP = "viridis"  # weights >= 0
CMAP_SIGNED = "RdBu_r"  # weights of both signs (Nyström, linear attention with the identity feature map)
# one flat square per weight: resampled in RGBA, so blank (NaN) cells leave no seams between their neighbours
CELLS = {"interpolation": "nearest", "interpolation_stage": "rgba"}
UNSEEN = "#e8e8e8"  # keys a query does not see (weight exactly 0)


# ---- the weights ------------------------------------------------------------------------------------------


def weights(
    mechanism: str | Mechanism,
    *,
    length: int | None = None,
    spatial_shape: tuple[int, ...] | None = None,
    pattern: Pattern | str = "noncausal_self",
    head: int = 0,
    seed: int = 0,
    heads: int = DEFAULT_HEADS,
    head_dim: int = DEFAULT_HEAD_DIM,
    path: str = "auto",
    options: dict[str, Any] | None = None,
    **more_options: Any,
) -> torch.Tensor:
    """The attention weights of one head: ``[Tq, Tk]`` float32 on the CPU (row i = query i, column j = key j).

    ``mechanism`` is a registered name (built with ``options``; a trainable one with ``heads``, ``head_dim``
    and parameters drawn from ``seed``) or a ``Mechanism`` module (used as it is). Options go as keywords or in
    ``options`` (needed for an option whose name is one of these keywords, e.g. ``options={"seed": 3}``: the
    mechanism's own seed, where ``seed`` seeds the inputs). The tokens are ``length``
    long (default 64), or a grid ``spatial_shape=(h, w)`` / ``(d, h, w)`` flattened row-major (a spatial
    mechanism defaults to 14x14). Cross patterns use as many keys as queries. q and k are random
    (``seed``): the picture is the pattern on random inputs, one draw for the content-dependent ones.

    Raises ``InvalidOption`` for a mixer, a bad head or size, or a mechanism that is not linear in v
    (its weights cannot be read this way), ``ShapeError`` when ``length`` and ``spatial_shape`` disagree,
    ``UnsupportedPattern`` for a pattern the mechanism does not support. All before the one-hot run.
    """
    mech = _build(mechanism, heads=heads, head_dim=head_dim, seed=seed, options=_merge(options, more_options))
    heads, head_dim = mech.heads or heads, mech.head_dim or head_dim  # a built module's own sizes
    pattern = _check_pattern(mech, pattern)
    n, shape = resolve_tokens(mech, length, spatial_shape)
    _check_head(mech, head, heads)
    q, k, gen = _draw_qk(n, heads, head_dim, seed)
    training = mech.training
    try:  # in eval mode (no dropout), and a module given by the caller goes back to its own mode after
        with torch.no_grad():
            mech.eval()
            _check_linear(mech, q, k, gen, pattern=pattern, spatial_shape=shape, path=path)
            return _one_hot_weights(mech, q, k, pattern=pattern, spatial_shape=shape, path=path)[head]
    finally:
        mech.train(training)


def _merge(options: dict[str, Any] | None, more: dict[str, Any]) -> dict[str, Any]:
    if options is not None and not isinstance(options, dict):
        raise InvalidOption(f"options={options!r} is not a dict of the mechanism's options")
    twice = sorted(set(options or {}) & set(more))
    if twice:
        raise InvalidOption(f"options {twice} were given both as keywords and in options=; give each once")
    return {**(options or {}), **more}


def random_qk(length: int, heads: int, head_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The q, k that :func:`weights` draws: standard normal ``[1, T, H, D]`` each, from a generator seeded
    with ``seed`` (q first), so that a caller can recompute the weights another way."""
    q, k, _ = _draw_qk(length, heads, head_dim, seed)
    return q, k


def _draw_qk(n: int, heads: int, head_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n, heads, head_dim, generator=gen)  # [1, T, H, D]
    k = torch.randn(1, n, heads, head_dim, generator=gen)
    return q, k, gen  # the generator goes on to draw the linearity check's values


def resolve_tokens(
    mech: Mechanism | type[Mechanism], length: int | None, spatial_shape: tuple[int, ...] | None
) -> tuple[int, tuple[int, ...] | None]:
    """(T, spatial_shape) of a picture: the given grid (its product must equal ``length`` when both are
    given), else ``length`` tokens (default 64; a spatial mechanism's default is a 14x14 grid)."""
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise InvalidOption(f"length={length!r} is not valid; expected a positive integer")
    if spatial_shape is None and length is None and mech.spatial:
        spatial_shape = DEFAULT_SPATIAL_SHAPE
    if spatial_shape is not None:
        shape = _check_grid(spatial_shape)
        if length is not None and length != math.prod(shape):
            raise ShapeError(
                f"spatial_shape {shape} has {math.prod(shape)} positions but length={length}; give one of them, "
                "or sizes whose product is the length"
            )
        n = math.prod(shape)
    else:
        shape, n = None, DEFAULT_LENGTH if length is None else length
    if n > MAX_TOKENS:
        raise InvalidOption(f"{n} tokens is too many to draw a [T, T] weight matrix; at most {MAX_TOKENS}")
    return n, shape


def _check_grid(spatial_shape: Any) -> tuple[int, ...]:
    try:
        shape = tuple(spatial_shape)
    except TypeError:
        raise ShapeError(f"spatial_shape={spatial_shape!r} is not a tuple; expected (h, w) or (d, h, w)") from None
    if len(shape) not in (1, 2, 3) or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ShapeError(f"spatial_shape={shape!r} is not valid; expected 1 to 3 positive integer sizes, e.g. (14, 14)")
    return shape


def _build(mechanism: str | Mechanism, *, heads: int, head_dim: int, seed: int, options: dict) -> Mechanism:
    if isinstance(mechanism, Mechanism):
        if options:
            raise InvalidOption(
                f"options {sorted(options)} were given with a built {mechanism.name} module; a module has its own "
                "options: pass the mechanism's name to build it with these"
            )
        mech = mechanism
    elif isinstance(mechanism, str):
        cls = REGISTRY.get(mechanism)  # UnknownMechanism with "did you mean"
        _refuse_mixer(cls)
        with torch.random.fork_rng(devices=[]):  # a trainable mechanism's parameters, from the seed
            torch.manual_seed(seed)
            mech = cls(heads=heads, head_dim=head_dim, **options)
    else:
        raise InvalidOption(f"mechanism={mechanism!r} is neither a mechanism name nor a Mechanism module")
    _refuse_mixer(type(mech))
    return mech


def _refuse_mixer(cls: type[Mechanism]) -> None:
    if cls.kind != "attention":
        raise InvalidOption(
            f"{cls.name} is a token mixer (kind={cls.kind!r}), not attention: it has no weights of keys per query "
            "to draw. viz draws mechanisms of kind 'attention' (attnkit list)"
        )


def _check_pattern(mech: Mechanism, pattern: Pattern | str) -> Pattern:
    pattern = as_pattern(pattern)
    if pattern not in mech.patterns:
        supported = ", ".join(sorted(p.value for p in mech.patterns))
        raise UnsupportedPattern(f"{mech.name} does not support {pattern.value}; it supports {supported}")
    return pattern


def _check_head(mech: Mechanism, head: int, heads: int) -> None:
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < heads:
        raise InvalidOption(f"head={head!r} is not valid for {mech.name} with {heads} heads; expected 0..{heads - 1}")


def _run(mech: Mechanism, q, k, v, *, pattern: Pattern, spatial_shape, path: str = "auto", **more: Any) -> torch.Tensor:
    """One call with q, k repeated over v's batch: ``[B, T, H, D]`` (``more``: key_padding_mask, scale)."""
    b = v.shape[0]
    q, k = q.expand(b, -1, -1, -1), k.expand(b, -1, -1, -1)
    return mech(q, k, v, pattern=pattern, spatial_shape=spatial_shape, path=path, **more).float()


def _check_linear(mech: Mechanism, q, k, gen: torch.Generator, **call: Any) -> None:
    """Refuse a mechanism whose output is not affine in v: its one-hot read-out would be a wrong picture."""
    v1 = torch.randn(q.shape, generator=gen)  # [1, T, H, Dv = D]
    v2 = torch.randn(v1.shape, generator=gen)
    o1, o2, o12, o0 = _run(mech, q, k, torch.cat([v1, v2, v1 + v2, torch.zeros_like(v1)]), **call)
    gap = (o12 + o0 - o1 - o2).norm().item()
    size = o1.norm().item() + o2.norm().item()
    if not math.isfinite(gap) or gap > LINEARITY_TOL * max(size, 1e-12):
        raise InvalidOption(
            f"{mech.name} is not linear in v on random inputs (||out(v1+v2) + out(0) - out(v1) - out(v2)|| = "
            f"{gap:.3g}, {gap / max(size, 1e-12):.3g} of ||out(v1)|| + ||out(v2)||, tolerance {LINEARITY_TOL}), "
            "so feeding one-hot values would not give its weights; viz cannot draw it"
        )


def _one_hot_weights(mech: Mechanism, q, k, **call: Any) -> torch.Tensor:
    """``[H, Tq, Tk]``: v = the identity over the keys, in slices of D columns (one batch row per slice)."""
    return one_hot_weights(mech, q, k, **call)[0]


def one_hot_weights(
    mech: Mechanism,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    value_dim: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    with_offset: bool = False,
    **call: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The implicit attention matrix of one input: ``[1, Hq, Tq, Tk]`` float32, read out with one-hot values.

    ``q [1, Tq, Hq, Dk]``, ``k [1, Tk, Hkv, Dk]`` (one input; GQA allowed), ``key_padding_mask [1, Tk]`` or None;
    ``call`` holds the rest of the mechanism's call (``pattern``, ``spatial_shape``, ``scale``, ``path``).
    ``value_dim`` is the width of the one-hot values (default ``Dk``; pass the real call's ``Dv`` so that a
    mechanism sized by it sees the same shapes). Exact for a mechanism affine in v: ``out = A v + c``, with
    ``c = out(v = 0)`` subtracted (``with_offset=True`` returns ``(A, c)``, ``c [1, Tq, Hq, D]``). The caller
    checks that it is (:func:`weights` on a random pair, ``attnkit.analysis.capture`` against the real output):
    this only reads."""
    _, n, kv_heads, dk = k.shape
    d = dk if value_dim is None else value_dim
    slices = math.ceil(n / d)
    keys = torch.arange(n)
    v = torch.zeros(slices + 1, n, kv_heads, d, dtype=q.dtype, device=q.device)  # row s: one-hot keys s*D ..
    v[keys // d, keys, :, keys % d] = 1.0  # the last row stays 0: the affine part, subtracted
    if key_padding_mask is not None:
        call["key_padding_mask"] = key_padding_mask.expand(slices + 1, -1)
    out = _run(mech, q, k, v, **call)  # [S + 1, Tq, Hq, D]
    offset = out[-1:]  # [1, Tq, Hq, D]
    out = out[:-1] - offset  # [S, Tq, Hq, D]: out[s, i, h, c] = weight of key s*D + c
    heads = out.shape[2]
    a = out.permute(2, 1, 0, 3).reshape(heads, out.shape[1], slices * d)[None, ..., :n]
    return (a, offset) if with_offset else a


# ---- drawing ----------------------------------------------------------------------------------------------


def resolve_query(query: int | tuple[int, ...] | None, n: int, shape: tuple[int, ...] | None) -> int:
    """The flat index of the query to draw: an index, or grid coordinates (one per axis of ``shape``);
    default the middle token (the centre cell of a grid)."""
    if query is None:
        return _flat(tuple(s // 2 for s in shape), shape) if shape else n // 2
    if isinstance(query, int) and not isinstance(query, bool):
        if not 0 <= query < n:
            raise InvalidOption(f"query={query} is outside the {n} tokens; expected 0..{n - 1}")
        return query
    if isinstance(query, tuple | list) and all(isinstance(c, int) and not isinstance(c, bool) for c in query):
        if shape is None:
            raise InvalidOption(f"query={tuple(query)} gives grid coordinates but no spatial_shape was given")
        if len(query) != len(shape) or any(not 0 <= c < s for c, s in zip(query, shape, strict=False)):
            raise InvalidOption(
                f"query={tuple(query)} is not a cell of the {'x'.join(map(str, shape))} grid; expected "
                f"{len(shape)} coordinates, each 0 <= c < its size"
            )
        return _flat(tuple(query), shape)
    raise InvalidOption(f"query={query!r} is not valid; expected a token index or grid coordinates such as (3, 5)")


def _flat(coords: tuple[int, ...], shape: tuple[int, ...]) -> int:
    index = 0
    for c, s in zip(coords, shape, strict=True):
        index = index * s + c
    return index


def _coords(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for s in reversed(shape):
        out.append(index % s)
        index //= s
    return tuple(reversed(out))


def colour_scale(w: torch.Tensor, log_scale: bool = False):
    """(values to draw, colormap, matplotlib norm, colourbar label) for weights ``w``.

    Keys a query does not see (weight exactly 0) are drawn blank (light grey), so the pattern reads at a
    glance. Linear: viridis from 0 to the largest weight, or a diverging map centred on 0 when some weights
    are negative. Log: |w| over four decades below the largest."""
    from matplotlib import colormaps, colors

    w = w.detach().float()
    top = w.abs().max().item()
    top = top if top > 0 else 1.0
    unseen = w == 0
    signed = bool((w < -1e-7 * top).any())
    values = torch.where(unseen, torch.full_like(w, float("nan")), w.abs() if log_scale else w)  # NaN: blank
    if log_scale:
        norm, cmap, label = colors.LogNorm(vmin=top * 1e-4, vmax=top, clip=True), CMAP, "weight (log)"
        label = "|weight| (log)" if signed else label
    elif signed:
        norm, cmap, label = colors.TwoSlopeNorm(vcenter=0.0, vmin=-top, vmax=top), CMAP_SIGNED, "weight (signed)"
    else:
        norm, cmap, label = colors.Normalize(vmin=0.0, vmax=top), CMAP, "weight"
    return values.numpy(), colormaps[cmap].with_extremes(bad=UNSEEN), norm, label


def pattern_figure(
    mechanism: str | Mechanism,
    *,
    length: int | None = None,
    spatial_shape: tuple[int, ...] | None = None,
    pattern: Pattern | str = "noncausal_self",
    head: int = 0,
    seed: int = 0,
    query: int | tuple[int, ...] | None = None,
    log_scale: bool = False,
    heads: int = DEFAULT_HEADS,
    head_dim: int = DEFAULT_HEAD_DIM,
    path: str = "auto",
    options: dict[str, Any] | None = None,
    **more_options: Any,
):
    """A matplotlib ``Figure`` of the pattern (arguments as :func:`weights`; ``query`` an index or grid cell).

    1-D: the whole ``[T, T]`` weight matrix (bands, strides and blocks at a glance) with ``query``'s row
    outlined, and that row below it as a strip. Spatial (``spatial_shape`` given or the mechanism spatial):
    ``query``'s weights as an h x w heatmap with its cell marked; a 3-D grid gives one panel per depth slice.
    ``log_scale`` draws |weight| on a log scale (small weights become visible)."""
    mech = _build(mechanism, heads=heads, head_dim=head_dim, seed=seed, options=_merge(options, more_options))
    n, shape = resolve_tokens(mech, length, spatial_shape)
    qi = resolve_query(query, n, shape)  # checked before any compute
    w = weights(mech, length=n, spatial_shape=shape, pattern=pattern, head=head, seed=seed, heads=heads,
                head_dim=head_dim, path=path)  # fmt: skip
    title = f"{mech.name}, {as_pattern(pattern).value}, head {head}, seed {seed}"
    if shape is None or len(shape) == 1:
        return _matrix_figure(w, qi, title, log_scale)
    return _grid_figure(w[qi], shape, qi, title, log_scale)


def _matrix_figure(w: torch.Tensor, qi: int, title: str, log_scale: bool):
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    values, cmap, norm, label = colour_scale(w, log_scale)
    tq, tk = w.shape
    fig = Figure(figsize=(6.4, 7.2), layout="constrained")
    top, strip = fig.subplots(2, 1, height_ratios=[tq, max(tq / 8, 1)])
    image = top.imshow(values, cmap=cmap, norm=norm, **CELLS, aspect="auto")
    top.add_patch(Rectangle((-0.5, qi - 0.5), tk, 1, fill=False, edgecolor="red", linewidth=1.2))
    top.set(title=title, xlabel="key", ylabel="query")
    strip.imshow(values[qi : qi + 1], cmap=cmap, norm=norm, **CELLS, aspect="auto")
    strip.set(yticks=[], xlabel=f"key (weights of query {qi})")
    fig.colorbar(image, ax=[top, strip], label=label, shrink=0.8)
    return fig


def _grid_figure(row: torch.Tensor, shape: tuple[int, ...], qi: int, title: str, log_scale: bool):
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    values, cmap, norm, label = colour_scale(row.reshape(shape), log_scale)
    volume = values if len(shape) == 3 else values[None]  # [depth, h, w]
    cell = _coords(qi, shape)
    depth = volume.shape[0]
    cols = min(depth, 4)
    rows = math.ceil(depth / cols)
    panel = 4.4 if depth == 1 else 2.6  # inches a side: one big 2-D map, or smaller depth slices
    fig = Figure(figsize=(panel * cols + 1.2, panel * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    image = None
    for z, ax in enumerate(axes):
        if z >= depth:
            ax.axis("off")
            continue
        image = ax.imshow(volume[z], cmap=cmap, norm=norm, **CELLS)
        if len(shape) == 2 or cell[0] == z:  # the query's cell
            ax.add_patch(Rectangle((cell[-1] - 0.5, cell[-2] - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        if len(shape) == 3:
            ax.set_title(f"depth {z}", fontsize=9)
        ax.set(xticks=[], yticks=[])
    fig.suptitle(f"{title}\nquery {cell} of {'x'.join(map(str, shape))}", fontsize=10)
    fig.colorbar(image, ax=list(axes), label=label, shrink=0.8)
    return fig


def save_pattern(mechanism: str | Mechanism, path: str | Path, *, query=None, **kwargs: Any) -> Path:
    """Draw :func:`pattern_figure` and write it as a PNG at ``path`` (folders made as needed); returns the path."""
    out = Path(path)
    fig = pattern_figure(mechanism, query=query, **kwargs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", dpi=100)
    except OSError as err:
        raise AttnkitError(f"cannot write the picture to {out}: {err.strerror or err}") from None
    log.info("wrote %s", out)
    return out


def thumbnail_png(w: torch.Tensor, *, pixels: int = 4) -> bytes:
    """A small PNG of a weight matrix or grid ``w`` (2-D), each weight a ``pixels`` square, no axes:
    drawn straight into an image (no figure), fast enough for a catalogue of dozens."""
    from matplotlib.image import imsave

    values, cmap, norm, _ = colour_scale(w)
    rgba = cmap(norm(values))  # [h, w, 4] floats
    big = torch.from_numpy(rgba).repeat_interleave(pixels, 0).repeat_interleave(pixels, 1)

    buf = io.BytesIO()
    imsave(buf, big.numpy(), format="png")
    return buf.getvalue()


def thumbnail_data_uri(w: torch.Tensor, *, pixels: int = 4) -> str:
    """``data:image/png;base64,...`` of :func:`thumbnail_png`, to embed in HTML with no network."""
    return "data:image/png;base64," + base64.b64encode(thumbnail_png(w, pixels=pixels)).decode("ascii")
