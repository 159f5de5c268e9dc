"""Quality cases: train a small model whose attention is the mechanism under test on one task, evaluate it.

One more kind of the benchmark's one case protocol (``case.BenchCase``): each case runs in a fresh
worker, lands in the same store, resumes and is interrupted like the speed cases. A mechanism that
lacks the task's pattern is recorded ``not_applicable``; a run whose loss stops being finite is
recorded ``diverged`` with its step, and the sweep goes on.

The backbone follows the task's output: token tasks train ``nn.CausalLM`` (causal_self), class tasks
``nn.EncoderClassifier`` (noncausal_self), series tasks ``nn.EncoderDecoder`` (teacher-forced through
noncausal_cross in training; scored on an autoregressive forecast decoded step by step with state,
through causal_cross). A spatial mechanism (it needs a grid) trains on tasks whose tokens are an image (digits:
``Task.image_shape``) through ``nn.ViT`` with 1×1 patches (``GreyLevelViT``), and is not applicable to the
others. Every mechanism gets the same model size, data, steps, seed and the task's one
learning rate (chosen once, with softmax), so the comparison is fair. Model-free baselines that a task
defines (``Task.baselines``: a forecast's seasonal naive) are stored beside the score, in ``extra``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..api import info
from ..errors import InvalidOption
from ..mechanism import Mechanism
from ..nn import CausalLM, EncoderClassifier, EncoderDecoder, ViT
from ..nn.blocks import POSITIONS
from ..nn.vit import VIT_POSITIONS
from ..patterns import Pattern
from .case import BenchCase, Budget
from .cases import select_mechanisms, split_names
from .tasks import IGNORE, TaskData, get_task
from .tasks import REGISTRY as TASKS

# Model sizes per preset (research B, Tier Q: pre-LN, 2 blocks, width 64 on CPU, MLP x4, learned absolute
# positions: without positions softmax attention plateaus at ~0.69 on MQAR).
# The token embedding starts at PyTorch's N(0, 1) and the output head is not tied to it: with GPT-2's
# 0.02 (tied or not) softmax stayed at chance (0.15) on MQAR for 1,200 steps; with N(0, 1) tied, too;
# with N(0, 1) untied it reaches 1.0 by step 500 (measured here, seed 0, cpu preset).
EMBED = {"embed_std": 1.0}
MODEL: dict[str, dict[str, Any]] = {
    "quick": {"dim": 32, "depth": 2, "heads": 2, "mlp_ratio": 2.0},
    "cpu": {"dim": 64, "depth": 2, "heads": 4, "mlp_ratio": 4.0},
    "gpu": {"dim": 128, "depth": 2, "heads": 4, "mlp_ratio": 4.0},
}
# --lr-sweep: Zoology's grid (logspace(-4, -2, 4)); per (task, mechanism, seed) the best learning rate counts
LR_GRID = (1e-4, 4.6e-4, 2.2e-3, 1e-2)
CURVE_POINTS = 10  # the metric is evaluated this many times during training (the learning curve)
EVAL_EXAMPLES = 256  # the curve's evaluations use at most this many test examples
# Spatial mechanisms on an image task: a ViT with 1×1 patches, so its tokens are the pixels the encoder of every
# other mechanism reads (T = 64 / 256 / 1024 at quick / cpu / gpu) and local windows stay local on the grid;
# with the grey level one-hot as channels, the patch embedding is the encoder's token embedding (GreyLevelViT).
VIT_PATCH = 1


@dataclass(frozen=True)
class QualityCase(BenchCase):
    kind: ClassVar[str] = "quality"
    timed: ClassVar[bool] = False  # its cost is training, not one call: no skip prediction from latencies

    task: str
    mechanism: str
    preset: str = "quick"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    lr: float | None = None  # None: the task's one learning rate; set by --lr-sweep
    positions: str = "learned"  # the backbone's positions: learned (default), rope or none (--positions)

    def __post_init__(self):
        if self.lr is not None and not (isinstance(self.lr, float) and 0 < self.lr < 1):
            raise InvalidOption(f"learning rate must be a float in (0, 1); got {self.lr!r}")
        if self.positions not in POSITIONS:
            raise InvalidOption(f"positions={self.positions!r}; expected one of {', '.join(POSITIONS)}")

    @property
    def learning_rate(self) -> float:
        return self._task.lr if self.lr is None else self.lr

    @property
    def _task(self):
        return get_task(self.task)

    @property
    def tokens(self) -> int:
        return self._task.preset(self.preset).seq_len

    @property
    def pattern(self) -> str:
        return self._task.patterns[0].value

    @property
    def series(self) -> tuple:
        options = json.dumps(self.options, sort_keys=True)
        return ("quality", self.task, self.mechanism, self.preset, options, self.learning_rate, self.positions)

    def key(self, device_name: str, threads: int) -> str:
        task = self._task
        what = {"kind": "quality", **asdict(self), "version": task.VERSION, "device_name": device_name}
        if self.lr is None:
            del what["lr"]  # the task's own rate: keys of stores written before --lr-sweep stay valid
        if self.positions == "learned":
            del what["positions"]  # likewise for the default positions
        return json.dumps(what, sort_keys=True)  # threads change the time, not the score

    def label(self) -> str:
        lr = "" if self.lr is None else f", lr {self.lr:g}"
        pos = "" if self.positions == "learned" else f", {self.positions} positions"
        return f"{self.mechanism} on {self.task} ({self.preset}, seed {self.seed}{lr}{pos})"

    def row(self) -> dict[str, Any]:
        task = self._task
        return {
            "kind": "quality",
            "mechanism": self.mechanism,
            "path": "auto",
            "pattern": self.pattern,
            "mode": "train",
            "tokens": self.tokens,
            "dtype": "float32",
            "options": self.options,
            "extra": {
                "task": self.task,
                "version": task.VERSION,
                "preset": self.preset,
                "seed": self.seed,
                "metric": task.metric.name,
                "higher_is_better": task.metric.higher_is_better,
                "lr": self.learning_rate,
                "lr_swept": self.lr is not None,
                "positions": self.positions,
                **self._backbone(),
            },  # fmt: skip
        }

    def _backbone(self) -> dict[str, str]:
        """``{"backbone": "ViT, 1x1 patches"}`` for a spatial mechanism on an image task; nothing otherwise, so the
        rows of every other case read as they always have."""
        if info(self.mechanism).spatial and on_image(self._task):
            return {"backbone": f"ViT, {VIT_PATCH}x{VIT_PATCH} patches"}
        return {}

    def measure(self, threads: int, budget: Budget) -> dict[str, Any]:
        task = self._task
        missing = [p for p in task.patterns if p not in info(self.mechanism).patterns]
        if missing:
            return {"status": "not_applicable", "reason": f"{self.mechanism} does not support {missing[0].value}"}
        if info(self.mechanism).spatial:
            if not on_image(task):
                reason = f"{self.mechanism} is spatial (it needs a grid) and {self.task}'s tokens are a sequence"
                return {"status": "not_applicable", "reason": reason}
            if self.positions not in VIT_POSITIONS:
                reason = f"the ViT that spatial mechanisms train has {' or '.join(VIT_POSITIONS)} positions"
                return {"status": "not_applicable", "reason": f"{reason}, not {self.positions}"}
        return train_and_evaluate(self, task)


def on_image(task) -> bool:
    """Whether the task's tokens are an image (it says on which grid: ``image_shape(preset)``)."""
    return callable(getattr(task, "image_shape", None))


class GreyLevelViT(nn.Module):
    """Pixel tokens ``[B, h·w]`` (grey levels ``0 .. levels-1``, row-major) as one-hot images ``[B, levels, h, w]``
    into :class:`attnkit.nn.ViT` with 1×1 patches (mean pooling): its patch embedding is then one learned vector
    per grey level (plus a bias, zero at first), initialised as the encoder's token embedding (``EMBED``), so the
    model differs from the pixel-sequence encoder in one thing: its attention is told the grid."""

    def __init__(self, levels: int, shape: tuple[int, int], num_classes: int, **vit: Any):
        super().__init__()
        self.levels, self.shape = levels, shape
        self.vit = ViT(shape, VIT_PATCH, levels, num_classes, pooling="mean", **vit)
        nn.init.normal_(self.vit.patches.proj.weight, std=EMBED["embed_std"])
        nn.init.zeros_(self.vit.patches.proj.bias)

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, h·w]`` grey levels -> logits ``[B, num_classes]``."""
        if key_padding_mask is not None:
            raise InvalidOption("an image has no padded pixels; the ViT takes no key_padding_mask")
        if x.dim() != 2 or x.shape[1] != self.shape[0] * self.shape[1]:
            raise InvalidOption(f"pixels must be [B, {self.shape[0] * self.shape[1]}]; got shape {tuple(x.shape)}")
        if x.numel() and (x.min() < 0 or x.max() >= self.levels):
            raise InvalidOption(f"grey levels must be in 0..{self.levels - 1}; got {x.min()}..{x.max()}")
        w = self.vit.patches.proj.weight
        images = F.one_hot(x, self.levels).to(w.dtype).view(x.shape[0], *self.shape, self.levels)  # [B, h, w, L]
        return self.vit(images.permute(0, 3, 1, 2))  # [B, L, h, w] -> [B, classes]


def build_model(case: QualityCase, task, vocab: int, longest: int) -> torch.nn.Module:
    """The task's backbone; learned positions reach ``longest`` tokens (the longest test variant), and their rows
    past the training length stay untrained: length generalisation wants ``positions="rope"`` or ``"none"``.
    A spatial mechanism on an image task trains a :class:`GreyLevelViT` of the same size."""
    size = dict(MODEL[case.preset])
    if task.output == "class" and info(case.mechanism).spatial and on_image(task):
        shape = task.image_shape(case.preset)
        return GreyLevelViT(vocab, shape, task.num_classes, mechanism=case.mechanism, positions=case.positions,
                            **size, **case.options)  # fmt: skip
    common = dict(mechanism=case.mechanism, positions=case.positions, max_positions=longest, **size, **case.options)
    if task.output == "class":
        return EncoderClassifier(task.num_classes, vocab=vocab, pooling="mean", **EMBED, **common)
    if task.output == "series":  # one value per step in and out
        return EncoderDecoder(in_dim=1, out_dim=1, cross_pattern=Pattern.NONCAUSAL_CROSS, **common)
    return CausalLM(vocab, tie_weights=False, **EMBED, **common)


@torch.no_grad()
def forecast(model: EncoderDecoder, history: torch.Tensor, guess: torch.Tensor) -> torch.Tensor:
    """``history [B, T_in, 1]``, the task's ``guess [B, H, 1]`` -> the forecast ``[B, H, 1]``: encode once,
    then one decoder step at a time with state (causal_cross), each fed its step of the guess, whose
    output corrects it. Equals the one-call ``guess + model(history, guess)`` for per-query mechanisms."""
    memory = model.encode(history)
    state, out = None, []
    for j in range(guess.shape[1]):
        step, state = model.decode(guess[:, j : j + 1], memory, state=state, return_state=True)
        out.append(guess[:, j : j + 1] + step)
    return torch.cat(out, dim=1)


def _loss(task, model, batch: TaskData) -> tuple[torch.Tensor, torch.Tensor]:
    if task.output == "class":
        logits = model(batch.inputs, key_padding_mask=batch.pad_mask)  # [B, classes]
        return F.cross_entropy(logits, batch.targets), logits
    if task.output == "series":
        guess = task.guess(batch.inputs, batch.targets.shape[1])  # [B, T_out, 1], known in advance
        pred = guess + model(batch.inputs, guess)  # the model predicts the guess's residual
        return F.mse_loss(pred, batch.targets), pred
    logits = model(batch.inputs)  # [B, T, V]
    targets = batch.targets if batch.loss_mask is None else batch.targets.masked_fill(~batch.loss_mask, IGNORE)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE), logits


def _predict(task, model, batch: TaskData) -> torch.Tensor:
    """What the metric scores: the forward pass's logits, or a series task's autoregressive forecast."""
    if task.output == "series":
        return forecast(model, batch.inputs, task.guess(batch.inputs, batch.targets.shape[1]))
    return _loss(task, model, batch)[1]


@torch.no_grad()
def evaluate(task, model, data: TaskData, batch_size: int) -> float:
    """The task's metric over ``data``, in batches (logits, or forecasts, gathered on CPU)."""
    model.eval()
    device = next(model.parameters()).device
    outs = [_predict(task, model, b.to(device)).cpu() for b in data.batches(batch_size)]
    model.train()
    return task.metric(torch.cat(outs), data.targets, data.loss_mask)


def train_and_evaluate(case: QualityCase, task) -> dict[str, Any]:
    p = task.preset(case.preset)
    train = task.make("train", case.preset, seed=case.seed)
    tests = [(v, task.make("test", case.preset, seed=case.seed, **v)) for v in task.variants(case.preset)]
    torch.manual_seed(case.seed)
    sequences = [train, *(d for _, d in tests)]
    longest = max(data.inputs.shape[1] for data in sequences)
    if task.output == "series":  # the decoder's positions count the forecast's steps
        longest = max(longest, *(data.targets.shape[1] for data in sequences))
    model = build_model(case, task, p.vocab, longest).to(case.device)
    params = sum(t.numel() for t in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=case.learning_rate, weight_decay=0.1)
    every = max(1, p.steps // CURVE_POINTS)
    probe = tests[0][1].select(torch.arange(min(EVAL_EXAMPLES, len(tests[0][1]))))
    curve, step, epoch, seen = [], 0, 0, 0
    started = time.perf_counter()
    while step < p.steps:
        for batch in train.batches(p.batch_size, seed=case.seed * 1000 + epoch):
            batch = batch.to(case.device)
            loss, _ = _loss(task, model, batch)
            if not math.isfinite(loss.item()):
                return {"status": "diverged", "reason": f"the loss became {loss.item()} at step {step}",
                        "extra": {**case.row()["extra"], "step": step, "curve": curve}}  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for module in model.modules():
                if isinstance(module, Mechanism):
                    module.after_step()
            step += 1
            seen += batch.inputs.numel()
            if step % every == 0 or step == p.steps:
                curve.append((step, round(loss.item(), 5), evaluate(task, model, probe, p.batch_size)))
            if step >= p.steps:
                break
        epoch += 1
    wall = time.perf_counter() - started
    scores = {json.dumps(v, sort_keys=True): evaluate(task, model, data, p.batch_size) for v, data in tests}
    score = sum(scores.values()) / len(scores)
    extra = {**case.row()["extra"], "variants": scores, "curve": curve, "params": params, "steps": p.steps,
             "tokens_per_s": seen / wall}  # fmt: skip
    baselines = [task.baselines(data) for _, data in tests]
    if baselines[0]:  # averaged over the test variants, as the score is
        extra["baseline"] = {k: sum(b[k] for b in baselines) / len(baselines) for k in baselines[0]}
    return {"status": "ok", "score": score, "median_ms": wall * 1e3 / p.steps, "extra": extra}


def quality_cases(
    *,
    tasks,
    names,
    preset: str,
    seeds: tuple[int, ...],
    device: str = "cpu",
    lrs: tuple[float, ...] | None = None,
    positions: str = "learned",
) -> list[QualityCase]:
    """Every (task, mechanism, seed), at each of ``lrs`` (None: the task's one rate); a mechanism without a
    task's pattern gives a not-applicable case."""
    if preset not in MODEL:
        raise InvalidOption(f"unknown quality preset {preset!r}; expected one of {', '.join(MODEL)}")
    task_names = []
    for glob in split_names(tasks):
        found = TASKS.names(glob)
        if not found:
            TASKS.get(glob)  # raises UnknownTask, with "did you mean" and the valid names
        task_names.extend(found)
    mechs = select_mechanisms(names)
    rates = (None,) if not lrs else tuple(dict.fromkeys(float(lr) for lr in lrs))
    return [
        QualityCase(t, m, preset, s, device=device, lr=lr, positions=positions)
        for t in dict.fromkeys(task_names)
        for m in mechs
        for s in seeds
        for lr in rates
    ]
