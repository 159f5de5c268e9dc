"""The report's quality section: what each mechanism is worth per pattern, against what it costs.

It opens with the answer, per pattern: the compositional index (``attnkit.bench.scores``) against the
forward speed-up over SDPA from the same store, with the Pareto front marked. Then the leaderboard per
pattern (CI, each task's score and its seed-matched difference from softmax), the learning curves, the
passkey and induction heatmaps, and the details per task.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from html import escape
from typing import Any

from ..api import info
from ..bench.derived import SDPA, curves, paired_speedup
from ..bench.scores import (
    BASELINE,
    as_int,
    build_reference,
    compositional_index,
    deltas_vs_softmax,
    load_reference,
    mechanism_label,
    mechanism_means,
    ok_quality,
    pareto_front,
    presets_of,
    reference_tasks,
    seed_scores,
    task_info,
)
from ..errors import AttnkitError
from .answer import _setting_of
from .charts import (
    MAX_LINES,
    Bars,
    Chart,
    Heatmap,
    Point,
    Scatter,
    Series,
    render,
    render_bars,
    render_heatmap,
    render_scatter,
)
from .sections import table

Rows = list[dict[str, Any]]


def _reference(shipped: dict | None, ok: Rows, preset: str) -> tuple[dict | None, str]:
    """The reference statistics to score ``preset`` against, and a sentence saying which they are."""
    tasks = reference_tasks(shipped, preset)
    if tasks:
        source = ((shipped or {}).get("sources") or {}).get(preset) or {}
        when = f", built {source['built'][:10]}" if source.get("built") else ""
        counts = sorted({str(s["n_mechanisms"]) for s in tasks.values() if s.get("n_mechanisms")})
        many = f"; {'/'.join(counts)} reference mechanisms" if counts else ""
        return shipped, (
            f"{preset} preset: z against the reference statistics shipped with attnkit ({', '.join(sorted(tasks))}"
            f"{many}{when}), so that every store is scored on one scale."
        )
    own = build_reference([r for r in ok if (r.get("extra") or {}).get("preset") == preset])
    if reference_tasks(own, preset):
        return own, (
            f"{preset} preset: no reference statistics ship for it, so z is taken against this store's own"
            " mechanisms: the scale moves when mechanisms are added, and the index does not compare across stores."
        )
    return None, (
        f"{preset} preset: no compositional index, as no reference statistics ship for it and this store has"
        " fewer than 3 mechanisms on every task. The per-task scores are below."
    )


def _default_items(mechanism: str) -> set[str]:
    """``{"window=256", ...}``: the mechanism's default options as the speed curves write them."""
    try:
        options = info(mechanism).options
    except AttnkitError:  # a mechanism the store knows and this install does not
        return set()
    return {f"{f.name}={f.default}" for f in dataclasses.fields(options) if f.default is not dataclasses.MISSING}


def _speed_label(curve) -> str:
    """A speed curve's mechanism as ``mechanism_label`` writes a quality row's. The speed rows record every
    option, defaults included, and a quality row only those it was given: options at their defaults drop."""
    defaults = _default_items(curve.mechanism)
    kept = [item for item in curve.options.split(", ") if item and item not in defaults]
    return f"{curve.mechanism} {', '.join(kept)}" if kept else curve.mechanism


def speed_at(rows: Rows, pattern: str, labels: set[str]) -> tuple[int, dict[str, float], str] | None:
    """(T, label -> forward speed-up over SDPA at T, the setting) for the mechanisms in ``labels``.

    T is the largest length at which SDPA softmax and the most of these mechanisms have an ok forward
    speed row that is not doubtful (one dtype, device and setting: the one with the most forward curves).
    A mechanism's speed-up is that of its fastest path (paired with SDPA in the same worker). None
    when there is no such row."""
    cs = curves(rows, kinds=("speed",))
    setting = _setting_of(cs)
    if setting is None:
        return None
    group = [c for c in cs if c.mode == "fwd" and not c.peer and c.pattern == pattern
             and (c.dtype, c.device, c.setting) == setting]  # fmt: skip
    base = next((c for c in group if (c.mechanism, c.path) == SDPA and not c.options), None)
    if base is None:
        return None

    def speeds(t: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in group:
            label = _speed_label(c)
            if label in labels and t in c.lengths and not c.at(t, "doubtful"):
                s = paired_speedup(c, base, t)
                if s and s > out.get(label, 0.0):
                    out[label] = s
        return out

    lengths = [t for t in base.lengths if base.at(t, "ms") and not base.at(t, "doubtful")]
    if not lengths:
        return None
    t = max(lengths, key=lambda t: (len(speeds(t)), t))
    found = speeds(t)
    return (t, found, f"{setting[0]} on {setting[1]}, {setting[2]}") if found else None


def _answer(rows: Rows, pattern: str, preset: str, ci: dict[str, tuple[float, tuple[str, ...]]], placed) -> str:
    """The scatter of CI against speed-up (``placed``: what ``speed_at`` found), or the CI ranking alone."""
    title = f"{pattern} ({preset}): quality vs speed"
    if not ci:
        return (
            f'<p class="note">{escape(pattern)}: no task of this pattern has reference statistics of its version for'
            f" the {escape(preset)} preset, so no compositional index; the scores are in the leaderboard.</p>"
        )
    tasks = sorted({t for _ci, ts in ci.values() for t in ts})
    ranking = sorted(ci, key=lambda m: (-ci[m][0], m))
    if placed is None:
        has_speed = any(r["kind"] == "speed" and r.get("pattern") == pattern for r in rows)
        why = (
            f"This store has speed rows for {escape(pattern)}, but none of these mechanisms has a forward one beside"
            " an SDPA figure that is not doubtful"
            if has_speed
            else f"This store has no speed rows for {escape(pattern)} (run <code>attnkit bench speed</code> into it)"
        )
        bars = Bars(f"{pattern} ({preset}): compositional index", "compositional index (z, higher is better)",
                    [(m, ci[m][0]) for m in ranking], caption=f"mean z over {', '.join(tasks)}")  # fmt: skip
        return f'<p class="note">{why}, so the compositional index is shown alone.</p>' + render_bars(bars)
    t, speed, setting = placed
    front = pareto_front({m: (speed[m], ci[m][0]) for m in speed})
    points = [Point(m, speed[m], ci[m][0], front=m in front) for m in ranking if m in speed]
    missing = [m for m in ranking if m not in speed]
    caption = (
        f"y: compositional index over {', '.join(tasks)}. x: forward speed-up over SDPA softmax at T={t}"
        f" ({setting}; each mechanism's fastest path), the largest T at which SDPA and the most of these"
        " mechanisms have a forward speed row that is not doubtful. Diamonds joined by the dashed line:"
        f" the Pareto front ({', '.join(sorted(front, key=lambda m: -speed[m]))})."
        + (f" Not placed (no such speed row at T={t}): {', '.join(missing)}." if missing else "")
    )
    chart = Scatter(title, f"speed-up over SDPA at T={t} (log)", "compositional index (z)", points, caption=caption)
    return render_scatter(chart)


def _task_label(task: str, version: int, versions: dict[str, set[int]]) -> str:
    return f"{task} v{version}" if len(versions[task]) > 1 else task


def _leaderboard(ok: Rows, preset: str, pattern: str, ci: dict[str, tuple[float, tuple[str, ...]]], placed) -> str:
    means = {k: v for k, v in mechanism_means(ok, preset).items() if k[0] == pattern}
    deltas = deltas_vs_softmax(ok, preset)
    infos = task_info(ok, preset)
    keys = sorted(means, key=lambda k: (k[1], k[2]))
    versions: dict[str, set[int]] = defaultdict(set)
    for _p, task, version in keys:
        versions[task].add(version)
    mechs = sorted({m for k in keys for m in means[k]})
    mechs.sort(key=lambda m: (-ci[m][0] if m in ci else float("inf"), m))
    headers = ["mechanism", "CI", "tasks in CI"] + ([f"speed-up at T={placed[0]}"] if placed else [])
    for key in keys:
        lower = "" if infos[key]["higher_is_better"] else ", lower is better"
        headers += [f"{_task_label(key[1], key[2], versions)} ({infos[key]['metric']}{lower})", "vs softmax"]
    body = []
    for m in mechs:
        row: list[Any] = [m, f"{ci[m][0]:+.2f}" if m in ci else "—", len(ci[m][1]) if m in ci else ""]
        if placed:
            row.append(f"{placed[1][m]:.2f}×" if m in placed[1] else "")
        for key in keys:
            score = means[key].get(m)
            delta = (deltas.get(key) or {}).get(m)
            row += ["" if score is None else f"{score:.3f}", f"{delta[0]:+.3f}" if delta else ""]
        body.append(row)
    return f"<h3>{escape(pattern)} ({escape(preset)} preset)</h3>" + table(headers, body)


def _curves(ok: Rows) -> list[str]:
    by_task: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in ok:
        extra = r.get("extra") or {}
        by_task[(r.get("pattern"), extra.get("task"), extra.get("metric"), extra.get("preset"))][
            mechanism_label(r)
        ].append(r)
    charts = []
    for (pattern, task, metric, preset), by_mech in sorted(by_task.items(), key=lambda kv: str(kv[0])):
        series = []
        for mech, rs in sorted(by_mech.items()):
            first = min(rs, key=lambda r: (r.get("extra") or {}).get("seed") or 0)
            pts = [(step, score) for step, _loss, score in (first.get("extra") or {}).get("curve") or []]
            series.append(Series(mech, pts, dashed=mech == BASELINE))
        caption = f"{pattern}, {preset} preset, each mechanism's first seed"
        for i in range(0, len(series), MAX_LINES):
            chart = Chart(f"{task}: {metric} while training", "step", str(metric), series[i : i + MAX_LINES],
                          log_y=False, caption=caption)  # fmt: skip
            charts.append(render(chart))
    return charts


def _variant(text: str) -> dict | None:
    """A test variant as stored (the JSON of its arguments), or None when it is not one."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _variant_heatmaps(ok: Rows, task: str, what: str, columns_of, x_label: str, note: str) -> list[str]:
    """One heatmap per (preset, version) of ``task``: mechanisms × test variants, the mean over seeds."""
    cells: dict[tuple, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    trained: dict[tuple, int] = {}
    for r in ok:
        extra = r.get("extra") or {}
        if extra.get("task") != task or not extra.get("variants"):
            continue
        key = (str(extra.get("preset")), as_int(extra.get("version")))
        trained[key] = r.get("tokens")
        for variant, score in extra["variants"].items():
            if isinstance(_variant(variant), dict) and isinstance(score, (int, float)):
                cells[key][mechanism_label(r)][variant].append(score)
    out = []
    for key, by_mech in sorted(cells.items()):
        preset, version = key
        variants = {v for per in by_mech.values() for v in per}
        try:
            columns = sorted(variants, key=lambda v: columns_of(_variant(v))[0])
        except TypeError:  # values of mixed types (a store is untrusted input)
            columns = sorted(variants)
        means = {m: {v: sum(s) / len(s) for v, s in per.items()} for m, per in by_mech.items()}
        mechs = sorted(means, key=lambda m: (-sum(means[m].values()) / len(means[m]), m))
        values = [[means[m].get(v) for v in columns] for m in mechs]
        caption = f"{preset} preset, task version {version}, trained at T={trained[key]}; {note}; mean over seeds"
        labels = [columns_of(_variant(v))[1] for v in columns]
        chart = Heatmap(f"{task}: {what}", mechs, labels, values, x_label=x_label, caption=caption)
        out.append(render_heatmap(chart))
    return out


def _baselines(rs: Rows) -> str:
    """A task's model-free scores on the same test data (the forecast's seasonal naive), mean over rows."""
    found: dict[str, list[float]] = defaultdict(list)
    for r in rs:
        baseline = (r.get("extra") or {}).get("baseline")
        for name, value in baseline.items() if isinstance(baseline, dict) else ():
            if isinstance(value, (int, float)) and math.isfinite(value):
                found[str(name)].append(float(value))
    return ", ".join(f"{name} {sum(v) / len(v):.4g}" for name, v in sorted(found.items()))


def _details(ok: Rows) -> str:
    out = []
    for preset in presets_of(ok):
        by_seed = seed_scores(ok, preset)
        deltas = deltas_vs_softmax(ok, preset)
        infos = task_info(ok, preset)
        rows_of: dict[tuple, list[dict]] = defaultdict(list)
        for r in ok:
            extra = r.get("extra") or {}
            if extra.get("preset") == preset:
                rows_of[(r.get("pattern"), extra["task"], as_int(extra.get("version")), mechanism_label(r))].append(r)
        for key in sorted(by_seed):
            higher = infos[key]["higher_is_better"]
            means = {m: sum(s.values()) / len(s) for m, s in by_seed[key].items()}
            for m in sorted(means, key=lambda m: -means[m] if higher else means[m]):
                rs = rows_of[(*key, m)]
                delta = (deltas.get(key) or {}).get(m)
                params = (rs[0].get("extra") or {}).get("params")
                tps = sum((r.get("extra") or {}).get("tokens_per_s") or 0 for r in rs) / len(rs)
                base = means.get("softmax")
                ratio = f"{means[m] / base:.3g}" if base and m != "softmax" else ""
                out.append([key[0], key[1], key[2], preset, m, infos[key]["metric"], f"{means[m]:.4g}",
                            f"{delta[0]:+.3g} ({delta[1]})" if delta else "", ratio, _baselines(rs),
                            len(by_seed[key][m]), params, f"{tps:,.0f}"])  # fmt: skip
    headers = ["pattern", "task", "version", "preset", "mechanism", "metric", "score", "vs softmax (seeds)",
               "/ softmax", "model-free baselines", "seeds", "parameters", "tokens/s"]  # fmt: skip
    return table(headers, out)


def quality(rows: Rows) -> str:
    q = [r for r in rows if r["kind"] == "quality"]
    if not q:
        return '<p class="empty">No quality results in this store: run <code>attnkit bench quality</code>.</p>'
    ok = ok_quality(rows)
    shipped = load_reference()
    answers, boards, notes = [], [], []
    for preset in presets_of(ok):
        reference, note = _reference(shipped, ok, preset)
        notes.append(note)
        ci = compositional_index(ok, reference, preset) if reference else {}
        for pattern in sorted({k[0] for k in mechanism_means(ok, preset)}):
            scored = ci.get(pattern, {})
            placed = speed_at(rows, pattern, set(scored)) if scored else None
            if reference:
                answers.append(_answer(rows, pattern, preset, scored, placed))
            boards.append(_leaderboard(ok, preset, pattern, scored, placed))
    intro = (
        "<p>Per pattern: each mechanism's compositional index (CI, as in CAB) against its forward speed-up over"
        " SDPA softmax. The CI is the mean over the pattern's tasks of z = (score − μ) / σ, sign-flipped where"
        " lower is better, where μ and σ are the mean and spread of reference mechanisms' scores on the task:"
        " 0 is the reference average, +1 one spread better. Mechanisms on the Pareto front are beaten by no"
        " other on both quality and speed.</p>"
    )
    if not ok:
        notes.append("No quality case finished ok yet, so there is nothing to score: see the table below.")
    answer = ('<div class="qblock" id="quality-answer"><h3>The answer: quality against speed</h3>' + intro
              + "".join(f'<p class="note">{escape(n)}</p>' for n in notes)
              + '<div class="charts">' + "".join(answers) + "</div></div>")  # fmt: skip
    board = (
        '<div class="qblock" id="quality-leaderboard"><h3>Leaderboard</h3><p>Small models trained from scratch on'
        " each task: the same backbone, data, steps, seed and learning rate for every mechanism. Score: the task's"
        " metric on its test data, the mean over seeds; vs softmax: the difference over the seeds both ran.</p>"
        + "".join(boards)
        + "</div>"
    )
    heatmaps = _variant_heatmaps(
        ok, "passkey", "exact match by length and needle depth",
        lambda v: ((v.get("length", 0), v.get("depth", 0)), f"{v.get('length')}\n{v.get('depth', 0):g}"),
        "test length / needle depth", "each cell the share of keys retrieved whole",
    ) + _variant_heatmaps(
        ok, "induction", "accuracy by test length",
        lambda v: (v.get("length", 0), str(v.get("length"))),
        "test length", "lengths past the training one test extrapolation",
    )  # fmt: skip
    skipped = [[r.get("pattern"), (r.get("extra") or {}).get("task"), r["mechanism"], r["status"], r.get("reason")]
               for r in q if r["status"] != "ok"]  # fmt: skip
    parts = [
        answer,
        board,
        '<div class="qblock"><h3>Learning curves</h3><div class="charts">' + "".join(_curves(ok)) + "</div></div>",
    ]
    if heatmaps:
        parts.append('<div class="qblock"><h3>Passkey and induction by test variant</h3><div class="charts">'
                     + "".join(heatmaps) + "</div></div>")  # fmt: skip
    parts.append('<div class="qblock"><h3>Details per task</h3>' + _details(ok) + "</div>")
    if skipped:
        parts.append(
            '<div class="qblock">' + table(["pattern", "task", "mechanism", "status", "why"], skipped) + "</div>"
        )
    return "".join(parts)
