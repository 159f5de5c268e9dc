"""Conversion of a softmax transformers model to Hedgehog linear attention by attention distillation.

Hedgehog (Zhang et al. 2024, "The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax
Mimicry", arXiv:2402.04347), stage one: every layer's feature map is trained, with the rest of the model
frozen, so that its normalised linear-attention weights phi(q_i).phi(k_j) / sum_j' match the softmax
weights of the same q, k (cross-entropy, ``attnkit.mechanisms.hedgehog.distill_attention``). The teacher's
q, k of all layers come from one pass of the original model over the data, so layers train one after another
independently. Then the model runs the trained maps (``attnkit.hf.use``). The paper's second stage
(fine-tuning the whole model on the task) is not done here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidOption
from ..mechanisms.hedgehog import Hedgehog, distill_attention
from ._interface import NAME
from ._use import mechanisms, restore, use
from .embeddings import Batch, sentence_embeddings, tokenize
from .sentences import EVAL_SENTENCES, TRAIN_SENTENCES

log = logging.getLogger(__name__)

DISTILLABLE = ("hedgehog",)  # trainable mechanisms with an attention-distillation loss


@dataclass
class ConversionReport:
    """What a conversion did. Similarities are cosines of held-out sentence embeddings to the original's."""

    mechanism: str
    layers: list[str]  # the attention modules, in model order
    loss_before: list[float]  # per layer: attention cross-entropy of the untrained map on the training data
    loss_after: list[float]  # per layer: the same after training
    similarity_before: torch.Tensor  # [N] per held-out sentence, untrained maps
    similarity_after: torch.Tensor  # [N] per held-out sentence, trained maps
    steps: int
    seconds: float  # wall time of the whole conversion (a measurement, machine-dependent)
    history: dict[str, list[float]] = field(default_factory=dict)  # per layer: the loss at every step

    def summary(self) -> str:
        n = len(self.layers)
        return (
            f"{self.mechanism}: {len(self.layers)} layers x {self.steps} steps in {self.seconds:.1f} s;"
            f" attention CE {sum(self.loss_before) / n:.3f} -> {sum(self.loss_after) / n:.3f};"
            f" held-out embedding similarity {self.similarity_before.mean():.4f} -> {self.similarity_after.mean():.4f}"
        )


def convert(
    model: nn.Module,
    mechanism: str = "hedgehog",
    data: Sequence[str] | Batch = TRAIN_SENTENCES,
    *,
    heldout: Sequence[str] | Batch = EVAL_SENTENCES,
    tokenizer=None,
    steps: int = 200,
    lr: float = 1e-2,
    feature_dim: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ConversionReport:
    """Distil each attention layer of the softmax ``model`` into ``mechanism``'s feature map, then switch to it.

    ``data``: training sentences (or a tokenised batch); ``heldout``: different sentences, on which the
    report compares sentence embeddings with the original model's, before and after training. ``steps``
    Adam steps (learning rate ``lr``) per layer on the whole of ``data``. The model is changed in place
    (``attnkit.hf.restore`` switches it back to softmax). Returns a :class:`ConversionReport`.
    """
    start = time.perf_counter()
    _check_args(model, mechanism, data, heldout, steps, lr)
    train, held = tokenize(data, model, tokenizer), tokenize(heldout, model, tokenizer)
    reference = sentence_embeddings(model, held)  # [N, D], the original
    teacher = _capture(model, train)
    use(model, mechanism, feature_dim=feature_dim)
    students = mechanisms(model)
    before = (sentence_embeddings(model, held) * reference).sum(-1)
    torch.manual_seed(seed)
    history = _distil(model, students, teacher, steps, lr, progress)
    after = (sentence_embeddings(model, held) * reference).sum(-1)
    report = ConversionReport(
        mechanism=mechanism,
        layers=list(students),
        loss_before=[h[0] for h in history.values()],
        loss_after=[h[-1] for h in history.values()],
        similarity_before=before,
        similarity_after=after,
        steps=steps,
        seconds=time.perf_counter() - start,
        history=history,
    )
    log.info("attnkit.hf.convert: %s", report.summary())
    return report


def _check_args(model, mechanism, data, heldout, steps, lr) -> None:
    if mechanism not in DISTILLABLE:
        raise InvalidOption(f"convert distils into {', '.join(DISTILLABLE)}; got mechanism={mechanism!r}")
    if getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME:
        raise InvalidOption("the model already runs attnkit attention; convert starts from its softmax original")
    if not isinstance(steps, int) or steps < 1:
        raise InvalidOption(f"steps must be a positive int; got {steps!r}")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise InvalidOption(f"lr must be a positive number; got {lr!r}")
    if not isinstance(data, dict) and not isinstance(heldout, dict):
        shared = set(data) & set(heldout) if not isinstance(data, str) and not isinstance(heldout, str) else set()
        if shared:
            raise InvalidOption(f"held-out sentences must not be training data; {len(shared)} are in both")


@dataclass
class _Call:
    """One captured softmax attention call: the teacher's q, k and how they were masked."""

    q: torch.Tensor  # [B, T, H, D]
    k: torch.Tensor  # [B, T, Hkv, D]
    pattern: object
    key_padding_mask: torch.Tensor | None
    scale: float | None


@torch.no_grad()
def _capture(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, _Call]:
    """The q, k each attention module gives its (softmax) attention on ``batch``, by module name."""
    use(model, "softmax")
    calls: dict[str, _Call] = {}
    hooks = []

    def recorder(name):
        def hook(_mech, args, kwargs):
            q, k = args[0], args[1]
            calls[name] = _Call(q.detach(), k.detach(), kwargs["pattern"], kwargs.get("key_padding_mask"),
                                kwargs.get("scale"))  # fmt: skip

        return hook

    try:
        for name, mech in mechanisms(model).items():
            hooks.append(mech.register_forward_pre_hook(recorder(name), with_kwargs=True))
        sentence_embeddings(model, batch, batch_size=len(batch["input_ids"]))  # one pass: one call per layer
    finally:
        for h in hooks:
            h.remove()
        restore(model)
    return calls


def _distil(model, students: dict[str, Hedgehog], teacher: dict[str, _Call], steps: int, lr: float, progress: bool):
    """Train each layer's map for ``steps`` Adam steps; returns each layer's loss at every step (and after)."""
    history: dict[str, list[float]] = {}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        bar = tqdm(total=steps * len(students), desc="hedgehog distillation", unit="step", disable=not progress)
        for layer, (name, student) in enumerate(students.items()):
            history[name] = _train_layer(student, teacher[name], steps, lr, bar, layer)
        bar.close()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return history


def _train_layer(student: Hedgehog, call: _Call, steps: int, lr: float, bar, layer: int) -> list[float]:
    params = list(student.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)

    def loss_fn():
        return distill_attention(call.q, call.k, student, pattern=call.pattern,
                                 key_padding_mask=call.key_padding_mask, scale=call.scale)  # fmt: skip

    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(layer=layer, loss=f"{losses[-1]:.4f}")
    with torch.no_grad():
        losses.append(loss_fn().item())  # after the last step
    return losses
