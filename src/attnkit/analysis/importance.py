"""Head importance: gradient (Michel et al. 2019) and ablation, for attnkit and Hugging Face models.

A gate ``xi[l, b, h]`` multiplies each head's output before the output projection: in attnkit layers a forward
hook on the mechanism scales its output ``[B, T, H, Dv]``; in Hugging Face models an attention function
registered through ``AttentionInterface`` (with ``eager_mask`` through ``AttentionMaskInterface``, without
which transformers passes no mask and padding leaks) runs the model's own ``eager_attention_forward`` and
scales its output ``[B, T, H, D]`` by a ``head_gate`` keyword that the model's forward passes through.

- ``importance_grad``: ``I(l, h) = E_x |dL(x) / d xi_h|`` at ``xi = 1``, divided by the layer's l2 norm over
  heads (Michel et al.), so each layer's column sums of squares are 1.
- ``importance_ablation``: ``E_x [L(x; xi_h = 0) - L(x)]``, one forward per head.

The loss ``L``: ``loss(outputs) -> [B]`` if given; an attnkit ``CausalLM`` fed token ids: next-token cross
entropy. A model with no loss of its own (a sentence encoder such as MiniLM, an attnkit ``Encoder``) is measured
by its embedding ``e`` (mean of the last hidden states over real tokens; a model returning ``[B, C]`` gives that):
ablation by the self-consistency loss ``1 - cos(e_gated, e)``, gradient by the proxy ``L = ||e||_2`` (the loss
``1 - cos`` has zero gradient at ``xi = 1``, where it is minimal, so it cannot rank heads by gradient; the norm's
gradient is the head's first-order push along the embedding's own direction).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidOption
from .capture import _attention_layers, _is_hf_model, run_model
from .maps import HeadMetrics

log = logging.getLogger(__name__)

GATE_IMPLEMENTATION = "attnkit_head_gate"  # the attention function registered with transformers
DESCRIPTIONS = {
    "importance_grad": "gradient importance E|dL/d gate_h| (Michel et al. 2019), l2-normalised per layer",
    "importance_ablation": "loss change when the head's output is gated to 0 (mean over inputs)",
}


def importance(
    model: nn.Module,
    inputs: Any,
    *,
    loss: Callable[[Any], torch.Tensor] | None = None,
    gradient: bool = True,
    ablation: bool = True,
    metrics: HeadMetrics | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Gradient and/or ablation importance of every head, ``{name: [L, H]}``; with ``metrics`` given they are
    put into its table (and descriptions) too. See the module docstring for the loss of each kind of model."""
    gates = _gates_for(model)
    objective = _objective(model, inputs, loss)
    training = model.training
    out: dict[str, torch.Tensor] = {}
    try:
        model.eval()
        with gates.installed(model):
            if gradient:
                out["importance_grad"] = _gradient(model, inputs, gates, objective)
            if ablation:
                out["importance_ablation"] = _ablation(model, inputs, gates, objective, progress)
    finally:
        model.train(training)
    if metrics is not None:
        for name, value in out.items():
            if tuple(value.shape) != tuple(metrics.table["entropy"].shape):
                raise InvalidOption(f"{name} is {tuple(value.shape)} but the metrics are for another model's heads")
            metrics.table[name] = value
            metrics.descriptions[name] = DESCRIPTIONS[name]
    return out


# ---- the loss ---------------------------------------------------------------------------------------------


@dataclass
class _Objective:
    """``value(outputs, clean)`` -> ``[B]`` losses; ``proxy`` the gradient's, when it differs."""

    value: Callable[[Any, torch.Tensor | None], torch.Tensor]
    proxy: Callable[[Any], torch.Tensor]
    needs_clean: bool  # value compares with the ungated embedding


def _objective(model: nn.Module, inputs: Any, loss: Callable | None) -> _Objective:
    if loss is not None:
        return _Objective(lambda out, _clean: _per_example(loss(out)), lambda out: _per_example(loss(out)), False)
    if _is_causal_lm(model) and isinstance(inputs, torch.Tensor) and inputs.dtype == torch.long:
        ce = _next_token_loss(inputs)
        return _Objective(lambda out, _clean: ce(out), ce, False)
    mask = _real_tokens(inputs)

    def embed(out: Any) -> torch.Tensor:
        return embedding(out, mask)

    def self_consistency(out: Any, clean: torch.Tensor | None) -> torch.Tensor:
        return 1 - F.cosine_similarity(embed(out), clean, dim=-1)

    return _Objective(self_consistency, lambda out: embed(out).norm(dim=-1), True)


def _per_example(value: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() > 1:
        raise InvalidOption("loss(outputs) must return a scalar or one loss per input [B]")
    return value.reshape(-1)


def _is_causal_lm(model: nn.Module) -> bool:
    from ..nn import CausalLM

    return isinstance(model, CausalLM)


def _next_token_loss(tokens: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def ce(logits: torch.Tensor) -> torch.Tensor:
        per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        return per_token.view(tokens.shape[0], -1).mean(-1)  # [B]

    return ce


def _real_tokens(inputs: Any) -> torch.Tensor | None:
    if hasattr(inputs, "keys") and "attention_mask" in inputs:
        return inputs["attention_mask"].bool()
    if hasattr(inputs, "keys") and "key_padding_mask" in inputs:
        return inputs["key_padding_mask"].bool()
    return None


def embedding(out: Any, mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, D]``: the mean of the last hidden states over real tokens (a ``[B, D]`` output as it is)."""
    hidden = getattr(out, "last_hidden_state", out)
    if isinstance(hidden, tuple | list):
        hidden = hidden[0]
    if hidden.dim() == 2:
        return hidden.float()
    if mask is None:
        return hidden.float().mean(1)
    m = mask[..., None].to(hidden.dtype)
    return ((hidden * m).sum(1) / m.sum(1).clamp_min(1)).float()


# ---- the two importances ----------------------------------------------------------------------------------


def _gradient(model: nn.Module, inputs: Any, gates: _Gates, objective: _Objective) -> torch.Tensor:
    gates.reset(_batch(inputs), requires_grad=True)
    out = run_model(model, inputs, **gates.kwargs())
    total = objective.proxy(out).sum()  # inputs are independent: d total / d xi[l, b] = dL_b / d xi[l, b]
    (grad,) = torch.autograd.grad(total, gates.values)  # [L, B, H]
    score = grad.abs().mean(1)  # [L, H]
    return score / score.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def _ablation(model: nn.Module, inputs: Any, gates: _Gates, objective: _Objective, progress: bool) -> torch.Tensor:
    with torch.no_grad():
        gates.reset(_batch(inputs))
        clean_out = run_model(model, inputs, **gates.kwargs())
        clean = embedding(clean_out, _real_tokens(inputs)) if objective.needs_clean else None
        base = objective.value(clean_out, clean)  # [B]: 0 for self-consistency
        layers, _, heads = gates.values.shape
        score = torch.zeros(layers, heads)
        for layer, head in _progress([(i, h) for i in range(layers) for h in range(heads)], progress):
            gates.values.fill_(1.0)
            gates.values[layer, :, head] = 0.0
            score[layer, head] = (objective.value(run_model(model, inputs, **gates.kwargs()), clean) - base).mean()
    return score


def _progress(items: list, show: bool):
    if not show:
        return items
    from tqdm.auto import tqdm  # shipped with transformers; only asked for when a bar is wanted

    return tqdm(items, desc="ablating heads", unit="head")


def _batch(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    if isinstance(inputs, tuple | list):
        return inputs[0].shape[0]
    return next(v for v in dict(inputs).values() if isinstance(v, torch.Tensor)).shape[0]


# ---- gates ------------------------------------------------------------------------------------------------


class _Gates:
    """``values [L, B, H]`` and how they reach the heads of one kind of model."""

    def __init__(self, heads: list[int]):
        if len(set(heads)) > 1:
            raise InvalidOption(f"the model's attention layers have different head counts {heads}; cannot gate them")
        self.layers, self.heads = len(heads), heads[0]
        self.values = torch.ones(self.layers, 1, self.heads)

    def reset(self, batch: int, requires_grad: bool = False) -> None:
        self.values = torch.ones(self.layers, batch, self.heads, requires_grad=requires_grad)

    def kwargs(self) -> dict[str, Any]:
        return {}

    def installed(self, model: nn.Module):
        raise NotImplementedError


class _AttnkitGates(_Gates):
    def __init__(self, model: nn.Module):
        self.layer_modules = list(_attention_layers(model, None).values())
        super().__init__([m.heads for m in self.layer_modules])

    def installed(self, model: nn.Module):
        return _Hooks(self)


class _Hooks:
    def __init__(self, gates: _AttnkitGates):
        self.gates, self.handles = gates, []

    def __enter__(self):
        for i, layer in enumerate(self.gates.layer_modules):

            def scale(mech, args, out, i=i):  # out [B, T, H, Dv]
                return out * self.gates.values[i][:, None, :, None].to(out.dtype)

            self.handles.append(layer.mechanism.register_forward_hook(scale))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class _HFGates(_Gates):
    def __init__(self, model: nn.Module):
        from ._hf_capture import _attention_modules

        self.modules = _attention_modules(model)
        if not self.modules:
            raise InvalidOption(f"{type(model).__name__} names no attention modules (_can_record_outputs); cannot gate")
        self.index = {id(m): i for i, (_, m) in enumerate(self.modules)}
        heads = [getattr(m, "num_heads", None) or getattr(m, "num_attention_heads", None) or
                 model.config.num_attention_heads for _, m in self.modules]  # fmt: skip
        super().__init__(heads)

    def kwargs(self) -> dict[str, Any]:
        return {"head_gate": self}

    def installed(self, model: nn.Module):
        return _GateImplementation(model)


class _GateImplementation:
    """Switch the model to the gating attention function, and back."""

    def __init__(self, model: nn.Module):
        self.model, self.previous = model, model.config._attn_implementation

    def __enter__(self):
        register_gate_attention()
        self.model.set_attn_implementation(GATE_IMPLEMENTATION)
        return self

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.previous)


def register_gate_attention() -> None:
    """Register the gating attention function and its mask with transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(GATE_IMPLEMENTATION, _gated_attention)
    AttentionMaskInterface.register(GATE_IMPLEMENTATION, eager_mask)


def _gated_attention(module, query, key, value, attention_mask, head_gate: _HFGates | None = None, **kwargs):
    """The model's own eager attention, its output ``[B, T, H, D]`` scaled by the gate of (layer, input, head)."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise InvalidOption(f"{type(module).__name__} has no eager_attention_forward to gate")
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    if head_gate is not None:
        gate = head_gate.values[head_gate.index[id(module)]]  # [B, H]
        out = out * gate[:, None, :, None].to(out.dtype)
    return out, weights


def _gates_for(model: nn.Module) -> _Gates:
    if _is_hf_model(model):
        return _HFGates(model)
    if isinstance(model, nn.Module):
        return _AttnkitGates(model)
    raise InvalidOption(f"importance() takes an attnkit model or a Hugging Face model; got {type(model).__name__}")
