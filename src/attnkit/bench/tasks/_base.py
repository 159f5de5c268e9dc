"""What every quality task shares: presets, seeds, the train/test duplicate check, metrics, the registry.

A task is one module in this package holding one :class:`Task` subclass decorated with
``@register_task("name")``. It declares its ``VERSION`` (stored with every result; bump it whenever
the generated data changes), the attention ``patterns`` it exercises, its ``metric``, one learning
rate ``lr`` (chosen once, for softmax attention, and kept for every mechanism so that they compare on
equal terms), the ``presets`` (data sizes only), and writes ``_generate(rng, split, n, preset, **variant)``.
The base class turns that into :meth:`Task.make`: seeded, deterministic, and with every test
example that also occurs in the training set (or twice in the test set) replaced by a fresh one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import InvalidOption, MissingDependency, UnknownTask, did_you_mean
from ...patterns import Pattern
from ...registry import Registry

IGNORE = -100  # target value at positions that carry no loss (PyTorch's cross_entropy ignore_index)
SPLITS = ("train", "test")
PRESETS = ("quick", "cpu", "gpu")
_TEST_SEED_OFFSET = 2**31  # train seeds < 2**31 <= test seeds, as Zoology does: the streams never meet
_MAX_TOP_UPS = 20  # rounds of regenerating replaced duplicates before giving up


# ------------------------------------------------------------------------------------------- metrics


def _predictions(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Logits ``[..., C]`` (one more dim than targets) -> argmax; predicted labels pass through."""
    if outputs.dim() == targets.dim() + 1:
        return outputs.argmax(-1)
    if outputs.shape != targets.shape:
        raise InvalidOption(f"outputs {tuple(outputs.shape)} fit neither targets {tuple(targets.shape)} nor logits")
    return outputs


def _token_mask(targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return (targets != IGNORE) if mask is None else mask.bool()


def accuracy(outputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Per-sequence accuracy over the masked positions, averaged over sequences (Zoology's
    ``compute_metrics``); one label per sequence (targets ``[N]``) is plain accuracy."""
    correct = _predictions(outputs, targets) == targets
    if targets.dim() == 1:
        return correct.float().mean().item()
    m = _token_mask(targets, mask)
    counted = m.sum(-1)  # [N]
    per_seq = (correct & m).sum(-1) / counted.clamp(min=1)
    return per_seq[counted > 0].mean().item()


def exact_match(outputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Share of sequences whose every masked position is right (a passkey counts only whole)."""
    m = _token_mask(targets, mask)
    wrong = (_predictions(outputs, targets) != targets) & m
    return (~wrong.any(-1))[m.any(-1)].float().mean().item()


def bits_per_byte(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean cross-entropy over the masked positions, in bits (one token = one byte)."""
    m = _token_mask(targets, mask)
    nll = F.cross_entropy(logits.float()[m], targets[m], reduction="mean")
    return nll.item() / math.log(2)


def mse(outputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean squared error over every value (or over the ``mask``-ed positions ``[N, T]``)."""
    err = (outputs.float() - targets.float()).square()
    if mask is not None:
        err = err[mask.bool()]
    return err.mean().item()


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], float] = field(repr=False)

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> float:
        return self.fn(outputs, targets, mask)


ACCURACY = Metric("accuracy", True, accuracy)
EXACT_MATCH = Metric("exact_match", True, exact_match)
BITS_PER_BYTE = Metric("bits_per_byte", False, bits_per_byte)
MSE = Metric("mse", False, mse)


# ------------------------------------------------------------------------------------- bundled data


def package_data(package: str, *parts: str, task: str) -> bytes:
    """The bytes of a data file that an installed package ships (``sklearn``, ``vega_datasets``), found
    without importing the package (importing sklearn imports scipy; vega_datasets imports pandas).
    :class:`~attnkit.errors.MissingDependency` when the package is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(
            f"the {task!r} task reads data bundled with the {package!r} package, which is not installed;"
            " install the tasks' extra: pip install 'attnkit[tasks]'"
        )
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise MissingDependency(
            f"the {task!r} task needs {'/'.join(parts)} from the {package!r} package, but this installation"
            f" of it has no such file ({path}); reinstall it: pip install --force-reinstall 'attnkit[tasks]'"
        )
    return path.read_bytes()


# ---------------------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class Preset:
    """Data sizes of one preset. Tasks subclass it to add their own knobs (number of keys, depth …)."""

    vocab: int  # token ids are in [0, vocab)
    seq_len: int  # T of the training inputs
    n_train: int
    n_test: int  # per test variant
    steps: int  # optimiser steps the training loop takes
    batch_size: int


@dataclass(frozen=True)
class TaskData:
    """One split, as tensors. A token task has ``targets [N, T]`` (``IGNORE`` outside ``loss_mask``);
    a classification task has ``targets [N]`` and pools the sequence over ``pad_mask``; a series task
    (``Task.dtype`` float32) has real values: ``inputs [N, T_in, 1]`` (the history) and
    ``targets [N, T_out, 1]`` (what follows it)."""

    inputs: torch.Tensor  # [N, T] long, or [N, T_in, 1] float
    targets: torch.Tensor  # [N, T] long, [N] long class labels, or [N, T_out, 1] float
    loss_mask: torch.Tensor | None  # [N, T] bool: where the loss and the metric count
    pad_mask: torch.Tensor | None  # [N, T] bool: True at real tokens; None when nothing is padded
    info: dict[str, Any]  # task, version, split, preset, seed, variant: stored with the result

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batches(self, batch_size: int, *, seed: int | None = None) -> Iterator[TaskData]:
        """Consecutive batches, or a seeded shuffle of them when ``seed`` is given."""
        n = len(self)
        order = torch.arange(n) if seed is None else torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        for i in range(0, n, batch_size):
            yield self.select(order[i : i + batch_size])

    def to(self, device: torch.device | str) -> TaskData:
        """The same data on ``device`` (the training loop moves each batch to the model's device)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TaskData(move(self.inputs), move(self.targets), move(self.loss_mask), move(self.pad_mask), self.info)

    def select(self, idx: torch.Tensor) -> TaskData:
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return TaskData(pick(self.inputs), pick(self.targets), pick(self.loss_mask), pick(self.pad_mask), self.info)


# ------------------------------------------------------------------------------------------ the task


def split_seed(split: str, seed: int) -> int:
    """Train uses ``seed``, test ``2**31 + seed``: disjoint for every seed below 2**31."""
    if split not in SPLITS:
        raise InvalidOption(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if not 0 <= seed < _TEST_SEED_OFFSET:
        raise InvalidOption(f"seed must be in [0, 2**31); got {seed}")
    return seed + (_TEST_SEED_OFFSET if split == "test" else 0)


def _stable_hash(obj: object) -> int:
    return zlib.crc32(repr(obj).encode())


class Task:
    """Base class of the quality tasks. Subclasses set the class attributes and write ``_generate``."""

    name: ClassVar[str] = ""  # set by @register_task
    VERSION: ClassVar[int]
    patterns: ClassVar[tuple[Pattern, ...]]
    metric: ClassVar[Metric]
    # "tokens": logits [N, T, vocab]; "class": logits [N, num_classes]; "series": values [N, T_out, 1]
    output: ClassVar[str] = "tokens"
    dtype: ClassVar[torch.dtype] = torch.long  # of inputs and targets: token ids, or float32 for series
    num_classes: ClassVar[int | None] = None
    lr: ClassVar[float]  # ONE learning rate, chosen once with softmax attention and kept for all mechanisms
    presets: ClassVar[dict[str, Preset]]

    def preset(self, preset: str | Preset) -> Preset:
        if isinstance(preset, Preset):
            return preset
        if preset not in self.presets:
            raise InvalidOption(
                f"task {self.name!r} has no preset {preset!r}.{did_you_mean(str(preset), self.presets)}"
                f" Available: {', '.join(self.presets)}"
            )
        return self.presets[preset]

    def variants(self, preset: str | Preset) -> list[dict[str, Any]]:
        """The test settings to evaluate (lengths, depths …); ``[{}]`` when there is only one."""
        return [{}]

    def make(self, split: str, preset: str | Preset = "cpu", *, seed: int = 0, **variant: Any) -> TaskData:
        """The ``split`` of this task at ``preset``'s sizes: deterministic in ``seed``; no test example
        (inputs row) occurs in the training data or twice in the test data."""
        p = self.preset(preset)
        n = p.n_train if split == "train" else p.n_test
        rows = self._unique_rows(split, p, seed, n, variant)
        if split == "test":
            train_keys = self._train_keys(p, seed)
            assert not any(_key(r) in train_keys for r in rows["inputs"]), "a test example occurs in train"
        info = {"task": self.name, "version": self.VERSION, "split": split, "seed": seed, "variant": dict(variant)}
        info["preset"] = preset if isinstance(preset, str) else dataclasses.asdict(p)
        info.update(self.data_info(p))
        as_tensor = lambda k, dt: torch.from_numpy(rows[k]).to(dt) if rows.get(k) is not None else None  # noqa: E731
        return TaskData(
            inputs=as_tensor("inputs", self.dtype),
            targets=as_tensor("targets", self.dtype),
            loss_mask=as_tensor("loss_mask", torch.bool),
            pad_mask=as_tensor("pad_mask", torch.bool),
            info=info,
        )

    def data_info(self, preset: Preset) -> dict[str, Any]:
        """Anything else the data depends on (a corpus taken from this Python, say), for ``info``."""
        return {}

    def score(self, outputs: torch.Tensor, data: TaskData) -> float:
        """The task's metric on a model's outputs (logits or predicted labels) for ``data``."""
        return self.metric(outputs, data.targets, data.loss_mask)

    def guess(self, history: torch.Tensor, horizon: int) -> torch.Tensor:
        """A series task's model-free forecast ``[N, horizon, C]`` from ``history [N, T_in, C]``: the decoder's
        known inputs, which the model corrects (it predicts the residual). Series tasks must define it."""
        raise NotImplementedError(f"task {self.name!r} has no guess(); only series tasks need one")

    def baselines(self, data: TaskData) -> dict[str, float]:
        """Scores of model-free predictors on ``data`` (a forecast's seasonal naive), stored beside the
        model's score; none by default."""
        return {}

    def _generate(
        self, rng: np.random.Generator, split: str, n: int, preset: Preset, **variant: Any
    ) -> dict[str, np.ndarray]:
        """``n`` examples of ``split``: a dict of numpy arrays ``inputs`` and ``targets`` (and ``loss_mask``,
        ``pad_mask`` where needed), first axis ``n``. Fewer than ``n`` means the data ran out."""
        raise NotImplementedError

    # -- seeds and duplicates

    def _rng(self, split: str, seed: int, variant: dict[str, Any]) -> np.random.Generator:
        entropy = [split_seed(split, seed), _stable_hash(self.name), _stable_hash(sorted(variant.items()))]
        return np.random.default_rng(np.random.SeedSequence(entropy))

    def _unique_rows(self, split: str, p: Preset, seed: int, n: int, variant: dict[str, Any]) -> dict:
        """Generate, drop repeats (and, for test, training examples), regenerate until ``n`` remain."""
        rng = self._rng(split, seed, variant)
        seen = set(self._train_keys(p, seed)) if split == "test" else set()
        kept: list[dict] = []
        have = 0
        for _ in range(_MAX_TOP_UPS):
            asked = n - have
            batch = self._generate(rng, split, asked, p, **variant)
            fresh = []
            for i, row in enumerate(batch["inputs"]):
                k = _key(row)
                if k not in seen:
                    seen.add(k)
                    fresh.append(i)
            kept.append({k: (v[fresh] if v is not None else None) for k, v in batch.items()})
            have += len(fresh)
            if have >= n or len(batch["inputs"]) < asked:  # done, or the data ran out
                break
        return {k: (None if kept[0][k] is None else np.concatenate([b[k] for b in kept])) for k in kept[0]}

    def _train_keys(self, p: Preset, seed: int) -> frozenset[bytes]:
        key = (self.name, self.VERSION, p, seed)
        if key not in _TRAIN_KEYS:
            rows = self._unique_rows("train", p, seed, p.n_train, {})
            _TRAIN_KEYS.clear()  # keep one training set's keys: enough for make("train") then the tests
            _TRAIN_KEYS[key] = frozenset(_key(r) for r in rows["inputs"])
        return _TRAIN_KEYS[key]


_TRAIN_KEYS: dict[tuple, frozenset[bytes]] = {}


def _key(row: np.ndarray) -> bytes:
    return np.ascontiguousarray(row).tobytes()


# ------------------------------------------------------------------------------------------ registry

REGISTRY: Registry[type[Task]] = Registry("task", "attnkit.bench.tasks", error=UnknownTask)


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: register a Task subclass under ``name``."""

    def deco(cls: type[Task]) -> type[Task]:
        missing = [a for a in ("VERSION", "patterns", "metric", "lr", "presets") if not hasattr(cls, a)]
        if missing:
            raise TypeError(f"task {name!r} does not declare {', '.join(missing)}")
        absent = [p for p in PRESETS if p not in cls.presets]
        if absent:
            raise TypeError(f"task {name!r} has no preset {', '.join(absent)}")
        cls.name = name
        return REGISTRY.register(name)(cls)

    return deco


def get_task(name: str) -> Task:
    """The task registered under ``name``; :class:`~attnkit.errors.UnknownTask` lists the valid names."""
    return REGISTRY.get(name)()


def list_tasks(pattern: str = "*") -> list[str]:
    """Registered task names matching a shell wildcard, sorted."""
    return REGISTRY.names(pattern)
