"""Quality tasks as data: the registry, shapes, determinism, disjoint splits, labels checked independently."""

from __future__ import annotations

import pytest
import torch

from attnkit.bench.tasks import IGNORE, PRESETS, Task, TaskData, get_task, list_tasks, split_seed
from attnkit.errors import InvalidOption, UnknownTask
from attnkit.patterns import Pattern

TASKS = list_tasks()


def _variants(task: Task) -> list[dict]:
    return task.variants("quick")


def _both(name: str, **variant) -> tuple[Task, TaskData, TaskData]:
    task = get_task(name)
    return task, task.make("train", "quick"), task.make("test", "quick", **variant)


def _rows(data: TaskData) -> set[bytes]:
    return {r.numpy().tobytes() for r in data.inputs}


# ------------------------------------------------------------------------------------ every task


def test_registry_lists_the_tasks():
    assert {"mqar", "induction", "listops", "selective_copy", "passkey", "byte_lm", "digits", "forecast"} <= set(TASKS)
    assert list_tasks("mq*") == ["mqar"]


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(UnknownTask, match=r"Did you mean 'mqar'\?.*Available: .*mqar"):
        get_task("mqr")
    with pytest.raises(InvalidOption, match="Available: quick, cpu, gpu"):
        get_task("mqar").make("train", "cpuu")


def test_train_and_test_seeds_are_disjoint():
    assert split_seed("train", 0) != split_seed("test", 0)
    assert max(split_seed("train", s) for s in range(100)) < min(split_seed("test", s) for s in range(100))
    with pytest.raises(InvalidOption):
        split_seed("valid", 0)


@pytest.mark.parametrize("name", TASKS)
def test_task_declares_what_a_result_stores(name):
    task = get_task(name)
    assert isinstance(task.VERSION, int) and task.VERSION >= 1
    assert task.patterns and all(isinstance(p, Pattern) for p in task.patterns)
    assert isinstance(task.metric.higher_is_better, bool) and task.metric.name
    assert isinstance(task.lr, float) and 0 < task.lr < 1
    assert set(PRESETS) <= set(task.presets)
    assert task.output in ("tokens", "class", "series")
    assert task.dtype == (torch.float32 if task.output == "series" else torch.long)


@pytest.mark.parametrize("name", TASKS)
def test_quick_preset_shapes_dtypes_and_info(name):
    task = get_task(name)
    p = task.preset("quick")
    for split, n in (("train", p.n_train), ("test", p.n_test)):
        for variant in [{}] if split == "train" else _variants(task):
            d = task.make(split, "quick", **variant)
            assert len(d) == n
            if task.output == "series":
                assert d.inputs.shape == (n, p.seq_len, 1) and d.targets.shape == (n, p.horizon, 1)
                assert d.inputs.dtype == d.targets.dtype == torch.float32
                assert d.inputs.isfinite().all() and d.targets.isfinite().all()
                assert d.loss_mask is None and d.pad_mask is None
                continue
            assert d.inputs.dtype == torch.long and d.inputs.dim() == 2
            assert 0 <= d.inputs.min() and d.inputs.max() < p.vocab
            if task.output == "tokens":
                assert d.targets.shape == d.inputs.shape and d.targets.dtype == torch.long
                assert d.loss_mask.dtype == torch.bool and d.loss_mask.shape == d.inputs.shape
                assert d.loss_mask.any(-1).all(), "every example has something to predict"
                assert ((d.targets == IGNORE) == ~d.loss_mask).all()
            else:
                assert d.targets.shape == (n,) and 0 <= d.targets.min() and d.targets.max() < task.num_classes
            if d.pad_mask is not None:
                assert d.pad_mask.shape == d.inputs.shape and d.pad_mask[:, 0].all()
            assert d.info["task"] == name and d.info["version"] == task.VERSION and d.info["variant"] == variant
            assert d.info["split"] == split


@pytest.mark.parametrize("name", TASKS)
def test_same_seed_same_data_other_seed_other_data(name):
    task = get_task(name)
    a, b, c = (task.make("train", "quick", seed=s) for s in (0, 0, 1))
    for f in ("inputs", "targets", "loss_mask", "pad_mask"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None and y is None) or torch.equal(x, y)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("name", TASKS)
def test_no_test_example_occurs_in_train_or_twice(name):
    task = get_task(name)
    train = _rows(task.make("train", "quick"))
    for variant in _variants(task):
        test = task.make("test", "quick", **variant)
        assert not (_rows(test) & train)
        assert len(_rows(test)) == len(test)


@pytest.mark.parametrize("name", TASKS)
def test_metric_on_perfect_and_constant_predictions(name):
    task = get_task(name)
    d = task.make("test", "quick", **_variants(task)[0])
    perfect, const = d.targets.clamp(min=0), torch.full_like(d.targets, 3)
    if task.metric.name == "mse":
        assert task.score(d.targets.clone(), d) == 0.0
        assert task.score(const, d) == pytest.approx(((3 - d.targets.double()) ** 2).mean().item(), rel=1e-6)
        return
    if task.metric.name == "bits_per_byte":  # needs logits: one-hot (perfect) and uniform (constant)
        vocab = task.preset("quick").vocab
        assert task.score(torch.nn.functional.one_hot(perfect, vocab).float() * 100, d) == pytest.approx(0, abs=1e-6)
        assert task.score(torch.zeros(*d.targets.shape, vocab), d) == pytest.approx(8.0)
        return
    assert task.score(perfect, d) == 1.0
    hit = const == d.targets
    if d.targets.dim() == 1:
        expected = hit.float().mean().item()
    elif task.metric.name == "exact_match":
        expected = (hit | ~d.loss_mask).all(-1).float().mean().item()
    else:
        expected = ((hit & d.loss_mask).sum(-1) / d.loss_mask.sum(-1)).mean().item()
    assert task.score(const, d) == pytest.approx(expected)
    logits = torch.nn.functional.one_hot(perfect, int(perfect.max()) + 1).float()
    assert task.score(logits, d) == 1.0, "logits are argmaxed"


# ------------------------------------------------------------------------ labels, independently


def test_mqar_answer_is_the_value_paired_with_the_key():
    _, train, test = _both("mqar")
    K = get_task("mqar").preset("quick").num_kv_pairs
    for d in (train, test):
        assert (d.loss_mask.sum(-1) == K).all(), "every key is queried exactly once"
        for x, y, m in zip(d.inputs.tolist(), d.targets.tolist(), d.loss_mask.tolist(), strict=True):
            pairs = dict(zip(x[0 : 2 * K : 2], x[1 : 2 * K : 2], strict=True))
            assert len(pairs) == K
            queried = [x[t] for t in range(len(x)) if m[t]]
            assert sorted(queried) == sorted(pairs), "the queries are the keys"
            assert all(y[t] == pairs[x[t]] for t in range(len(x)) if m[t])
            assert all(t >= 2 * K for t in range(len(x)) if m[t]), "queries come after the pairs"


def test_induction_target_is_the_token_after_the_earlier_trigger():
    task = get_task("induction")
    p = task.preset("quick")
    prefix = p.vocab - 2
    lengths = [v["length"] for v in task.variants("quick")]
    assert lengths == [16, 32, 64, 128, 256], "0.5x … 8x the training length"
    for length in lengths:
        d = task.make("test", "quick", length=length)
        assert d.inputs.shape == (p.n_test, length)
        assert (d.loss_mask.sum(-1) == 1).all() and d.loss_mask[:, -1].all(), "only the last position counts"
        for x, y in zip(d.inputs.tolist(), d.targets[:, -1].tolist(), strict=True):
            assert x[-1] == prefix
            triggers = [t for t in range(length - 1) if x[t] == prefix]
            assert 1 <= len(triggers) <= p.num_triggers
            assert all(x[t + 1] == y for t in triggers)
    train = task.make("train", "quick")
    for x, m, y in zip(train.inputs.tolist(), train.loss_mask.tolist(), train.targets.tolist(), strict=True):
        triggers = [t for t in range(len(x) - 1) if x[t] == prefix]
        counted = [t for t in range(len(x)) if m[t]]
        assert counted == triggers[1:] + [len(x) - 1], "the loss counts the repeated triggers and the end"
        assert {y[t] for t in counted} == {x[triggers[0] + 1]}, "each counted target is the copied token"
        assert all(y[t] == IGNORE for t in range(len(x)) if not m[t])


def _eval_listops(tokens: list[int]) -> int:
    """Evaluate a ListOps token sequence with a stack (independent of the generator's recursion)."""
    import statistics

    ops = {10: min, 11: max, 12: lambda v: int(statistics.median(v)), 13: lambda v: sum(v) % 10}
    stack: list[list] = [[]]
    for t in tokens:
        if t in ops:
            stack.append([t])
        elif t == 14:  # close: apply the innermost operator
            op, *args = stack.pop()
            assert len(args) >= 2
            stack[-1].append(ops[op](args))
        else:
            assert 0 <= t <= 9
            stack[-1].append(t)
    (value,) = stack.pop()
    assert not stack
    return value


def test_listops_labels_match_an_independent_evaluation():
    task, train, test = _both("listops")
    p = task.preset("quick")
    assert _eval_listops([12, 1, 2, 14]) == 1 and _eval_listops([13, 9, 12, 4, 7, 5, 14, 14]) == 4
    for d in (train, test):
        lengths = d.pad_mask.sum(-1)
        assert (lengths > p.min_len).all() and (lengths <= p.seq_len).all()
        assert (d.inputs[~d.pad_mask] == 15).all() and (d.inputs[d.pad_mask] != 15).all()
        for x, n, y in zip(d.inputs.tolist(), lengths.tolist(), d.targets.tolist(), strict=True):
            assert x[0] in (10, 11, 12, 13) and x[n - 1] == 14, "an expression, closed"
            assert _eval_listops(x[:n]) == y


def test_selective_copy_targets_are_the_content_tokens_in_order():
    task, train, test = _both("selective_copy")
    p = task.preset("quick")
    copy, blank = p.vocab - 1, p.vocab - 2
    for d in (train, test):
        for x, y, m in zip(d.inputs.tolist(), d.targets.tolist(), d.loss_mask.tolist(), strict=True):
            c = x.index(copy)
            assert c == p.seq_len - p.n_copy - 1 and x.count(copy) == 1
            assert all(t == blank for t in x[c + 1 :]), "blanks after the copy token"
            content = [t for t in x[:c] if t != blank]
            assert [y[t] for t in range(len(x)) if m[t]] == content and len(content) == p.n_copy
            assert m == [t > c for t in range(len(x))], "the loss is on the trailing blanks only"


def test_passkey_answer_is_the_needles_digits_on_the_grid():
    from attnkit.bench.tasks.passkey import KEY, QUERY

    task = get_task("passkey")
    p = task.preset("quick")
    grid = task.variants("quick")
    assert len(grid) == len(p.test_lengths) * len(p.test_depths)
    for split, variant in [("train", {})] + [("test", v) for v in grid]:
        d = task.make(split, "quick", **variant)
        T = variant.get("length", p.seq_len)
        assert d.inputs.shape[1] == T and (d.loss_mask.sum(-1) == p.digits).all()
        for x, y, m in zip(d.inputs.tolist(), d.targets.tolist(), d.loss_mask.tolist(), strict=True):
            s = x.index(KEY)
            assert x.count(KEY) == 1 and x.count(QUERY) == 1 and x.index(QUERY) == T - p.digits
            needle = x[s + 1 : s + 1 + p.digits]
            assert [y[t] for t in range(T) if m[t]] == needle
            assert x[T - p.digits + 1 :] == needle[:-1], "teacher-forced digits after [Q]"
            if "depth" in variant:
                assert s == round(variant["depth"] * (T - p.digits - p.digits - 1))


def test_byte_lm_windows_come_from_their_splits_documents():
    from attnkit.bench.tasks.byte_lm import _documents, _split_of

    task, train, test = _both("byte_lm")
    p = task.preset("quick")
    docs = _documents(p.corpus, p.max_bytes)
    names = {_split_of(n) for n, _ in docs}
    assert names == {"train", "test"}, "both splits get documents"
    assert test.info["python"] and test.info["corpus"] == "pydoc"
    for d, split in ((train, "train"), (test, "test")):
        mine = [t for n, t in docs if _split_of(n) == split]
        assert torch.equal(d.targets[:, :-1], d.inputs[:, 1:]) and d.loss_mask.all()
        for x, y in zip(d.inputs.tolist(), d.targets[:, -1].tolist(), strict=True):
            window = bytes(x + [y])
            assert any(window in t for t in mine)


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
@pytest.mark.parametrize("name", TASKS)
def test_larger_presets_are_valid_configurations(name, preset):
    """Two examples at each larger preset's lengths and knobs (the full sizes are for the benchmark)."""
    import dataclasses

    task = get_task(name)
    p = dataclasses.replace(task.preset(preset), n_train=4, n_test=2)
    assert task.make("train", p).inputs.shape[:2] == (4, p.seq_len)
    for variant in task.variants(p)[-1:]:
        assert len(task.make("test", p, **variant)) == 2


# ------------------------------------------------------------------ bundled data: digits, forecast


def _digits_file() -> dict[bytes, int]:
    """sklearn's digits read here with the csv module (8×8 pixels as bytes -> label), independently."""
    import csv
    import gzip
    import importlib.util
    from pathlib import Path

    root = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0])
    with gzip.open(root / "datasets" / "data" / "digits.csv.gz", "rt") as f:
        rows = [[int(float(v)) for v in r] for r in csv.reader(f)]
    return {bytes(r[:64]): r[64] for r in rows}


def test_digits_split_is_fixed_across_seeds_and_disjoint():
    from attnkit.bench.tasks.digits import split_indices

    train_idx, test_idx = split_indices()
    assert len(train_idx) == 1437 and len(test_idx) == 360, "scikit-learn's 1,797 images are all distinct"
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    task = get_task("digits")
    p = task.preset("cpu")
    a, b = (task.make("test", p, seed=s) for s in (0, 1))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets), "one test set for every seed"
    t0, t1 = (task.make("train", p, seed=s) for s in (0, 1))
    assert not torch.equal(t0.inputs, t1.inputs), "the seed orders the training images"
    assert _rows(t0) == _rows(t1) and len(_rows(t0)) == 1437, "… but they are the same 1,437 images"
    assert not _rows(t0) & _rows(a)


def test_digits_tokens_labels_and_upsampling():
    from attnkit.bench.tasks.digits import upsample

    img = torch.arange(64).reshape(1, 8, 8).numpy()
    up = upsample(img, 16)
    assert up.shape == (1, 16, 16) and (up[0, 2 * 3 + 1, 2 * 5] == img[0, 3, 5]) and (up[:, ::2, ::2] == img).all()
    assert upsample(img, 32).shape == (1, 32, 32) and (upsample(img, 32)[:, 3::4, ::4] == img).all()
    with pytest.raises(ValueError):
        upsample(img, 12)
    task = get_task("digits")
    labels = _digits_file()
    for preset, side in (("quick", 8), ("cpu", 16)):
        p = task.preset(preset)
        assert p.seq_len == side * side and p.vocab == 17
        d = task.make("test", preset)
        assert d.inputs.shape == (p.n_test, side * side) and 0 <= d.inputs.min() and d.inputs.max() <= 16
        images = d.inputs.reshape(-1, side, side)[:, :: side // 8, :: side // 8]  # back to 8×8, row-major
        assert [labels[bytes(x)] for x in images.reshape(-1, 64).tolist()] == d.targets.tolist()
    assert d.targets.unique().tolist() == list(range(10))


def _hours_of(windows: torch.Tensor) -> list[int]:
    """The start hour of each window ``[N, L, 1]`` in the normalised series, found by its values."""
    from attnkit.bench.tasks.forecast import normalised_series

    z = normalised_series()[0].astype("float32")
    at: dict[bytes, list[int]] = {}
    for h in range(len(z) - 8):
        at.setdefault(z[h : h + 8].tobytes(), []).append(h)
    found = []
    for w in windows[..., 0].numpy():
        hours = [h for h in at[w[:8].tobytes()] if (z[h : h + len(w)] == w).all()]
        assert len(hours) == 1, "every window is one stretch of the series"
        found += hours
    return found


def test_forecast_windows_are_contiguous_and_do_not_cross_the_split():
    task = get_task("forecast")
    p = task.preset("quick")
    train, test = task.make("train", "quick"), task.make("test", "quick")
    cut = test.info["train_hours"]
    assert test.info["hours"] == 8760 and cut == 7008
    length = p.seq_len + p.horizon
    for d in (train, test):
        whole = torch.cat([d.inputs, d.targets], dim=1)  # the history, then what follows it
        starts = _hours_of(whole)
        if d is train:
            assert max(starts) + length <= cut, "training windows end before the test hours"
        else:
            assert min(starts) >= cut and max(starts) + length <= 8760, "test windows, history too, after"
            assert max(starts) - min(starts) > (8760 - cut) // 2, "spread over the test hours"
    other = task.make("test", "quick", seed=5)
    assert torch.equal(other.inputs, test.inputs), "one test set for every seed"
    assert not torch.equal(task.make("train", "quick", seed=5).inputs, train.inputs)


def test_forecast_is_normalised_with_the_training_hours_only():
    from attnkit.bench.tasks.forecast import hourly_series, normalised_series

    raw = hourly_series()
    assert len(raw) == 8760 and raw.min() > 30 and raw.max() < 80, "hourly °F, the DST gap filled"
    z, mean, std = normalised_series()
    train = raw[:7008]
    assert mean == pytest.approx(train.mean()) and std == pytest.approx(train.std())
    assert abs(mean - raw.mean()) > 0.5, "the whole year's mean differs: the check can tell them apart"
    d = get_task("forecast").make("train", "quick")
    assert d.info["mean"] == mean and d.info["std"] == std
    values = d.inputs[..., 0].double() * std + mean  # back to °F: the raw series at the window's hours
    for h, v in zip(_hours_of(d.inputs), values, strict=True):
        assert torch.allclose(v, torch.from_numpy(raw[h : h + len(v)]), atol=1e-4)
    assert abs(z[:7008].mean()) < 1e-9 and z[:7008].std() == pytest.approx(1.0)


def test_seasonal_naive_forecast_and_its_mse_by_hand():
    from attnkit.bench.tasks.forecast import seasonal_naive

    history = torch.tensor([[1.0, 2.0, 3.0, 4.0]])[..., None]
    assert seasonal_naive(history, 3, period=2)[0, :, 0].tolist() == [3.0, 4.0, 3.0], "the last season, repeated"
    assert seasonal_naive(history, 1, period=4)[0, :, 0].tolist() == [1.0]
    with pytest.raises(ValueError):
        seasonal_naive(history, 2, period=5)
    task = get_task("forecast")
    hours = torch.arange(30.0)[None, :, None]  # 30 hours of history: 24 hours before the next two is 6, 7
    targets = torch.tensor([[6.5, 9.0]])[..., None]
    data = TaskData(hours, targets, None, None, {})
    assert task.baselines(data) == {
        "seasonal_naive_mse": pytest.approx((0.5**2 + 2.0**2) / 2),
        "persistence_mse": pytest.approx(((29 - 6.5) ** 2 + (29 - 9.0) ** 2) / 2),  # the last value, 29, held
    }


@pytest.mark.parametrize(
    ("package", "load"), [("sklearn", "digits._images"), ("vega_datasets", "forecast.hourly_series")]
)
def test_a_missing_data_package_names_the_extra_to_install(monkeypatch, package, load):
    import importlib
    import importlib.util

    from attnkit.errors import MissingDependency

    module, fn = load.split(".")
    loader = getattr(importlib.import_module(f"attnkit.bench.tasks.{module}"), fn).__wrapped__  # not the cache
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    wanted = rf"'{package}' package, which is not installed.*pip install 'attnkit\[tasks\]'"
    with pytest.raises(MissingDependency, match=wanted):
        loader()
    assert issubclass(MissingDependency, ImportError)
