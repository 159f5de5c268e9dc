"""Scores of the quality benchmark: the CAB-style compositional index, the difference from softmax, the Pareto front.

CAB (Comprehensive Attention Benchmarking, ICML 2023) puts every task on one scale by z-normalising
its metric against fixed reference statistics, flipping the sign where lower is better, and
averaging over a pattern's tasks (research B §1.4). Here, per preset and task:

- a mechanism's score x is the mean over its seeds of the task's metric (each seed's score is the
  mean of the rows of that seed);
- the reference mean μ and standard deviation σ are taken over the reference mechanisms, one value
  each (their x), from a run stored in the package (``reference_scores.json``, written by
  ``scripts/build_reference_scores.py``), so that a new mechanism scores on a fixed scale;
- z = (x − μ) / σ, negated for lower-is-better metrics (higher z is better on every task);
- the compositional index (CI) of a mechanism on a pattern is the mean of its z over the pattern's
  tasks that have a reference of the same task version (rows of another version are left out,
  never mixed in: a new generator makes a new task).

The difference from softmax compares seed-matched means: only the seeds both mechanisms ran.
Everything here is a pure function of stored rows.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

REFERENCE_FILE = "reference_scores.json"
REFERENCE_FORMAT = 1
MIN_MECHANISMS = 3  # a task needs this many reference mechanisms for its σ to mean anything
# When the reference mechanisms all score (nearly) alike, e.g. all solve MQAR at the quick sizes or
# all sit at chance, σ is ~0 and z would be huge or infinite. σ is floored at one hundredth of the
# metric's unit (one point of accuracy; 0.01 bits per byte), so such a task can still rank a
# mechanism that falls behind the reference, on a scale that stays finite. The JSON keeps the raw σ
# beside the one used, and says which tasks were floored.
# A metric without such a unit (an MSE on z-normalised data, ~1e-3 here) is floored at the same fraction of
# its reference mean instead: an absolute 0.01 would flatten every z to ~0.
SIGMA_FLOOR = 0.01
UNIT_METRICS = frozenset({"accuracy", "exact_match", "bits_per_byte"})
BASELINE = "softmax"


def sigma_floor(metric: str, mean: float) -> float:
    """The least σ a task's z-scores use (module comment above)."""
    return SIGMA_FLOOR if metric in UNIT_METRICS else max(SIGMA_FLOOR * abs(mean), 1e-12)


TaskKey = tuple[str, str, int]  # (pattern, task, task version)


def mechanism_label(row: dict[str, Any]) -> str:
    """The mechanism's name, with its options when a row has any (``sliding_window window=16``): runs of
    one mechanism with other options are other entries. Options are written as the speed curves write them."""
    options = ", ".join(f"{k}={v}" for k, v in sorted((row.get("options") or {}).items()))
    return f"{row['mechanism']} {options}" if options else str(row["mechanism"])


def as_int(value: Any) -> int:
    """A stored integer (task version, seed); 0 for anything else (a store is untrusted input)."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def ok_quality(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The quality rows with a finite score and a task; of a learning-rate sweep, the best rate's row."""
    out = []
    for r in rows:
        if r.get("kind") != "quality" or r.get("status") != "ok" or not isinstance(r.get("extra"), dict):
            continue
        score = r.get("score")
        if isinstance(score, (int, float)) and math.isfinite(score) and isinstance(r["extra"].get("task"), str):
            out.append(r)
    return best_over_lr(out)


def presets_of(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({str((r.get("extra") or {}).get("preset")) for r in ok_quality(rows)})


def seed_scores(rows: list[dict[str, Any]], preset: str) -> dict[TaskKey, dict[str, dict[int, float]]]:
    """(pattern, task, version) -> mechanism -> seed -> score, from the preset's ok quality rows (two rows
    of one seed, e.g. from two devices, are averaged)."""
    acc: dict[TaskKey, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in ok_quality(rows):
        extra = r.get("extra") or {}
        if extra.get("preset") != preset:
            continue
        key = (str(r.get("pattern")), str(extra["task"]), as_int(extra.get("version")))
        acc[key][mechanism_label(r)][as_int(extra.get("seed"))].append(float(r["score"]))
    return {
        k: {m: {s: sum(v) / len(v) for s, v in seeds.items()} for m, seeds in by_mech.items()}
        for k, by_mech in acc.items()
    }


def task_info(rows: list[dict[str, Any]], preset: str) -> dict[TaskKey, dict[str, Any]]:
    """(pattern, task, version) -> {"metric", "higher_is_better"} as the rows state them."""
    out: dict[TaskKey, dict[str, Any]] = {}
    for r in ok_quality(rows):
        extra = r.get("extra") or {}
        if extra.get("preset") == preset:
            key = (str(r.get("pattern")), str(extra["task"]), as_int(extra.get("version")))
            out.setdefault(
                key, {"metric": extra.get("metric"), "higher_is_better": extra.get("higher_is_better", True)}
            )
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def mechanism_means(rows: list[dict[str, Any]], preset: str) -> dict[TaskKey, dict[str, float]]:
    """(pattern, task, version) -> mechanism -> its score: the mean over its seeds."""
    return {k: {m: _mean(seeds.values()) for m, seeds in by.items()} for k, by in seed_scores(rows, preset).items()}


# ---- the reference ------------------------------------------------------------------------------------


def build_reference(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Reference statistics from a store's rows: per preset and task, the mean and standard deviation of
    the mechanisms' scores (one value per mechanism, the mean over its seeds), for the newest version of
    each task that has at least ``MIN_MECHANISMS`` mechanisms. σ is the population standard deviation
    over those mechanisms (the reference set is the population the scale describes), floored at
    :func:`sigma_floor`."""
    presets: dict[str, dict[str, Any]] = {}
    for preset in presets_of(rows):
        by_seed = seed_scores(rows, preset)
        means = mechanism_means(rows, preset)
        infos = task_info(rows, preset)
        newest: dict[str, TaskKey] = {}
        for key in means:
            if key[1] not in newest or key[2] > newest[key[1]][2]:
                newest[key[1]] = key
        tasks = {}
        for task, key in sorted(newest.items()):
            by_mech = means[key]
            if len(by_mech) < MIN_MECHANISMS:
                continue
            values = list(by_mech.values())
            mu = _mean(values)
            raw = math.sqrt(_mean((v - mu) ** 2 for v in values))
            floor = sigma_floor(str(infos[key]["metric"]), mu)
            seeds = sorted({s for seeds in by_seed[key].values() for s in seeds})
            tasks[task] = {
                "version": key[2],
                "pattern": key[0],
                "metric": infos[key]["metric"],
                "higher_is_better": bool(infos[key]["higher_is_better"]),
                "mean": mu,
                "std": max(raw, floor),
                "std_raw": raw,
                "std_floor": floor,
                "std_floored": raw < floor,
                "n_mechanisms": len(by_mech),
                "mechanisms": sorted(by_mech),
                "seeds": seeds,
            }
        if tasks:
            presets[preset] = tasks
    return {"format": REFERENCE_FORMAT, "sigma_floor": SIGMA_FLOOR, "presets": presets}


def load_reference(path: str | Path | None = None) -> dict[str, Any] | None:
    """The reference statistics shipped with attnkit (or those at ``path``); None when there are none
    or they are of another format."""
    try:
        if path is None:
            text = resources.files("attnkit.bench").joinpath(REFERENCE_FILE).read_text(encoding="utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
        ref = json.loads(text)
    except (OSError, ValueError):
        return None
    return ref if isinstance(ref, dict) and ref.get("format") == REFERENCE_FORMAT else None


def reference_tasks(reference: dict[str, Any] | None, preset: str) -> dict[str, dict[str, Any]]:
    """The reference's tasks for a preset ({} when it has none)."""
    return ((reference or {}).get("presets") or {}).get(preset) or {}


# ---- the compositional index --------------------------------------------------------------------------


def z_scores(
    rows: list[dict[str, Any]], reference: dict[str, Any] | None, preset: str
) -> dict[TaskKey, dict[str, float]]:
    """(pattern, task, version) -> mechanism -> z, for the tasks whose reference has the same version."""
    ref = reference_tasks(reference, preset)
    out = {}
    for key, by_mech in mechanism_means(rows, preset).items():
        stats = ref.get(key[1])
        if stats is None or stats["version"] != key[2]:
            continue  # no reference for this task, or one of another version: not mixed in
        sign = 1.0 if stats["higher_is_better"] else -1.0
        out[key] = {m: sign * (x - stats["mean"]) / stats["std"] for m, x in by_mech.items()}
    return out


def compositional_index(
    rows: list[dict[str, Any]], reference: dict[str, Any] | None, preset: str
) -> dict[str, dict[str, tuple[float, tuple[str, ...]]]]:
    """pattern -> mechanism -> (CI, the tasks it averages): the mean of the mechanism's z over the
    pattern's tasks that have a reference of the same version. A mechanism that lacks one of those
    tasks averages over fewer: the tasks say which."""
    per: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for (pattern, task, _version), by_mech in z_scores(rows, reference, preset).items():
        for mech, z in by_mech.items():
            per[pattern][mech][task] = z
    return {
        pattern: {m: (_mean(zs.values()), tuple(sorted(zs))) for m, zs in sorted(by_mech.items())}
        for pattern, by_mech in sorted(per.items())
    }


def deltas_vs_softmax(rows: list[dict[str, Any]], preset: str) -> dict[TaskKey, dict[str, tuple[float, int]]]:
    """(pattern, task, version) -> mechanism -> (its mean minus softmax's over the seeds both ran, how many
    seeds that is). Mechanisms sharing no seed with softmax, and softmax itself, are left out."""
    out: dict[TaskKey, dict[str, tuple[float, int]]] = {}
    for key, by_mech in seed_scores(rows, preset).items():
        base = by_mech.get(BASELINE)
        if not base:
            continue
        deltas = {}
        for mech, seeds in by_mech.items():
            common = sorted(set(seeds) & set(base))
            if mech != BASELINE and common:
                deltas[mech] = (_mean(seeds[s] for s in common) - _mean(base[s] for s in common), len(common))
        out[key] = deltas
    return out


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """The names of the points no other point beats on both axes (higher is better on both): a point is
    off the front only when another is at least as good on both and better on one. Equal points are
    all on the front (or all off it)."""
    front = set()
    for name, (x, y) in points.items():
        beaten = any(ox >= x and oy >= y and (ox > x or oy > y) for other, (ox, oy) in points.items() if other != name)
        if not beaten:
            front.add(name)
    return front


def best_over_lr(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ok quality rows -> one row per (task, mechanism, preset, seed, options): a learning-rate sweep keeps
    its best rate (Zoology and MAD report the max over their lr grid); rows without a sweep pass through."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        extra = r.get("extra") or {}
        key = (extra.get("task"), r["mechanism"], extra.get("preset"), extra.get("seed"), extra.get("version"),
               json.dumps(r.get("options") or {}, sort_keys=True))  # fmt: skip
        higher = extra.get("higher_is_better", True)
        old = best.get(key)
        if old is None or (r["score"] > old["score"] if higher else r["score"] < old["score"]):
            best[key] = r
    return list(best.values())
