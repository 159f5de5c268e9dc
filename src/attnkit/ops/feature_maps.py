"""Feature maps phi of kernelized (linear) attention: softmax(q.k) is replaced by phi(q).phi(k)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu1": lambda x: F.elu(x) + 1.0,  # Katharopoulos et al. 2020: positive, smooth
    "relu": F.relu,
    "identity": lambda x: x,  # no guarantee of positive scores: the normaliser may vanish
}
