"""The report's catalogue: one thumbnail of the attention pattern of every registered attention mechanism.

Computed when the report is built (no store rows, nothing cached on disk) with :mod:`attnkit.viz`: a 1-D
mechanism shows its whole ``[T, T]`` weight matrix at T = 48, a spatial one the weights of the centre query
of a 14x14 grid. Each is drawn with its first ``example_options`` (the small sizes of the conformance tests,
so a window, a stride or a block shows at this length) on random q, k (seed 0). The thumbnails are PNGs
embedded as base64, so the report needs no network. A mechanism that cannot be drawn gets a note instead.
"""

from __future__ import annotations

import logging
import time
from html import escape
from typing import Any

from .. import viz
from ..api import mechanisms
from ..describe import MechanismInfo
from ..errors import AttnkitError
from ..mechanism import REGISTRY
from ..patterns import Pattern

log = logging.getLogger(__name__)

LENGTH = 48  # tokens of a 1-D thumbnail
GRID = (14, 14)  # grid of a spatial thumbnail
PIXELS = 3  # screen pixels per weight (a 48 x 48 matrix becomes 144 x 144)
SEED = 0

STYLE = (
    "<style>.thumbs { display: flex; flex-wrap: wrap; gap: 10px; }"
    " figure.thumb { margin: 0; width: 168px; border: 1px solid #e3e3e3; border-radius: 4px; padding: 6px; }"
    " figure.thumb img { display: block; margin: 0 auto; image-rendering: pixelated; }"
    " figure.thumb .failed { font-size: 11px; color: #b35900; min-height: 60px; }</style>"
)


def catalogue(rows: list[dict[str, Any]]) -> str:
    """HTML: a thumbnail per attention mechanism, with its name, family and patterns (``rows`` unused: the
    pictures come from the mechanisms, not the store)."""
    started = time.perf_counter()
    infos = mechanisms(kind="attention")
    figures = [_thumbnail(i) for i in infos]
    log.info("catalogue: %d thumbnails in %.1f s", len(infos), time.perf_counter() - started)
    intro = (
        f"<p>Which keys each query sees, and with what weight: the weights read out of each mechanism with one-hot"
        f" values (<code>attnkit viz</code>), head 0, random q and k (seed {SEED}), so a content-routed mechanism"
        f" shows one draw. 1-D mechanisms: the {LENGTH}&times;{LENGTH} matrix (row = query, column = key, first"
        f" supported pattern); spatial ones: the centre query of a {GRID[0]}&times;{GRID[1]} grid. Light grey ="
        " not seen (weight 0); blue–red = weights of both signs. Options: the first example set of each"
        " mechanism's tests, shown under its name.</p>"
    )
    return STYLE + intro + f'<div class="thumbs">{"".join(figures)}</div>'


def _first_pattern(i: MechanismInfo) -> Pattern:
    return next(p for p in Pattern if p in i.patterns)


def _thumbnail(i: MechanismInfo) -> str:
    options = dict(REGISTRY.get(i.name).example_options[0])
    pattern = _first_pattern(i)
    shape = GRID if i.spatial else None
    try:
        w = viz.weights(i.name, length=None if shape else LENGTH, spatial_shape=shape, pattern=pattern, seed=SEED,
                        options=options)  # fmt: skip
        if shape:
            w = w[viz.resolve_query(None, w.shape[0], shape)].reshape(shape)
        uri = viz.thumbnail_data_uri(w, pixels=PIXELS)
        size = w.shape[1] * PIXELS
        picture = f'<img src="{uri}" width="{size}" height="{w.shape[0] * PIXELS}" alt="{escape(i.name)} pattern">'
    except Exception as err:  # noqa: BLE001 - one mechanism that cannot be drawn must not sink the report
        # a refusal (not linear in v) is expected and shown in the note; anything else is worth a warning
        (log.info if isinstance(err, AttnkitError) else log.warning)("catalogue: %s not drawn: %s", i.name, err)
        picture = f'<div class="failed">not drawn: {escape(type(err).__name__)}: {escape(str(err)[:240])}</div>'
    patterns = " ".join(p.short for p in Pattern if p in i.patterns)
    shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "default options"
    caption = (
        f"<b>{escape(i.name)}</b><br>{escape(i.family)} · {escape(patterns)}<br>"
        f'<span class="note">{escape(pattern.value)}; {escape(shown)}</span>'
    )
    figure = f'<figure class="thumb" data-mechanism="{escape(i.name)}">'
    return f"{figure}{picture}<figcaption>{caption}</figcaption></figure>"
