"""What a capture holds: per-layer, per-head attention weights of one batch of inputs, and what the metrics,
plots and page need to read them (tokens, padding, the grid of an image model, value vectors).

Produced by :func:`attnkit.analysis.capture` (attnkit layers and Hugging Face models alike); read by
``attnkit.analysis.metrics`` and the views. Weights are float32 on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ShapeError


@dataclass
class AttentionMaps:
    """Attention of ``L`` layers of ``H`` heads on a batch of ``B`` inputs.

    - ``weights[l]``: ``[B, H, Tq, Tk]``; row i holds the weights query i gives the keys. For a softmax-family
      mechanism a real query's row sums to 1 over real keys; for kernel, decay and recurrent mechanisms it is
      their implicit attention matrix (the weights their output equals), which may not sum to 1 or be >= 0.
      Padded keys have weight 0; rows of padded queries are 0.
    - ``values[l]``: ``[B, Tk, H, Dv]``, the value vectors the weights mix (None when not captured); with the
      weights they give each head's update ``sum_j A_ij v_j`` (no-op detection).
    - ``tokens``: per input, the token strings (None: positions only, e.g. a model fed ids or images).
    - ``key_padding_mask``: ``[B, Tk]`` bool, True = real token (None: every token is real).
    - ``causal``: the model attends causally (j <= i); entropy is normalised by log(i + 1) then.
    - ``spatial_shape``: for image models, the patch grid the tokens after the first ``prefix`` tokens (a
      class token) lie on, row-major; distances are then measured on the grid.
    - ``layer_names``: one per layer (module path, or ``"layer 3"``); ``source``: ``"attnkit"`` or ``"hf"``.
    - ``mechanisms``: one per layer, the attention mechanism's name (``"softmax"`` for a stock HF model).
    """

    weights: list[torch.Tensor]
    values: list[torch.Tensor | None]
    layer_names: list[str]
    mechanisms: list[str]
    source: str
    tokens: list[list[str]] | None = None
    key_padding_mask: torch.Tensor | None = None
    causal: bool = False
    spatial_shape: tuple[int, ...] | None = None
    prefix: int = 0

    @property
    def layers(self) -> int:
        return len(self.weights)

    @property
    def heads(self) -> int:
        return self.weights[0].shape[1] if self.weights else 0

    @property
    def batch(self) -> int:
        return self.weights[0].shape[0] if self.weights else 0

    def real(self) -> torch.Tensor:
        """``[B, Tk]`` bool: the real tokens (all True without a padding mask)."""
        b, _, _, tk = self.weights[0].shape
        if self.key_padding_mask is None:
            return torch.ones(b, tk, dtype=torch.bool)
        return self.key_padding_mask


@dataclass
class HeadMetrics:
    """Everything measured per head of one :class:`AttentionMaps` (``attnkit.analysis.metrics.measure``).

    - ``table``: metric name -> ``[L, H]`` float tensor (entropy, normalised entropy, mean distance, local
      fraction, sink ratio, role scores, no-op fraction, importance when measured, ...), one column of the
      page's sortable table each; ``descriptions``: metric name -> one line (formula, unit) for tooltips.
    - ``profile``: ``[L, H, N]`` attention mass at each distance bin, ``profile_bins`` the bins' labels.
    - ``sinks``: the detected sink keys, one ``(position, label, mean mass received)`` per sink.
    - ``roles``: ``[L][H]`` lists of role names detected for each head (``"previous-token"``, ``"induction"``,
      ``"duplicate-token"``, ``"sink"``, ``"no-op"``, ``"local"``, ``"broad"``...).
    - ``js``: ``[L*H, L*H]`` Jensen–Shannon distances between heads (head ``l*H + h``); ``embedding``:
      ``[L*H, 2]`` their 2-D embedding (classical MDS); ``clusters``: ``[L*H]`` int cluster labels.
    """

    table: dict[str, torch.Tensor]
    descriptions: dict[str, str]
    profile: torch.Tensor
    profile_bins: list[str]
    sinks: list[tuple[int, str, float]]
    roles: list[list[list[str]]]
    js: torch.Tensor
    embedding: torch.Tensor
    clusters: torch.Tensor


def grid_and_prefix(spatial_shape, prefix: int | None, tokens: int) -> tuple[tuple[int, ...] | None, int]:
    """The patch grid of ``tokens`` captured tokens and how many come before it (a class token): ``prefix``
    defaults to whatever the grid leaves; ``(None, 0)`` without a grid. ``ShapeError`` when they do not fit."""
    if spatial_shape is None:
        return None, 0
    spatial_shape = tuple(int(s) for s in spatial_shape)
    cells = math.prod(spatial_shape)
    prefix = tokens - cells if prefix is None else prefix
    if prefix < 0 or prefix + cells != tokens:
        raise ShapeError(
            f"spatial_shape {spatial_shape} with prefix {prefix} does not fit the {tokens} tokens captured"
        )
    return spatial_shape, prefix
