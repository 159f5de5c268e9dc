"""The report's quality section: what each mechanism is worth per task and pattern, and how it learned."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .charts import MAX_LINES, Chart, Series, render
from .sections import table


def quality(rows: list[dict[str, Any]]) -> str:
    q = [r for r in rows if r["kind"] == "quality"]
    if not q:
        return '<p class="empty">No quality results in this store: run <code>attnkit bench quality</code>.</p>'
    ok = [r for r in q if r["status"] == "ok" and r.get("score") is not None]
    by_task: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in ok:
        extra = r.get("extra") or {}
        key = (r.get("pattern"), extra.get("task"), extra.get("metric"), extra.get("higher_is_better", True),
               extra.get("preset"))  # fmt: skip
        by_task[key][r["mechanism"]].append(r)
    out, charts = [], []
    for (pattern, task, metric, higher, preset), by_mech in sorted(by_task.items(), key=lambda kv: str(kv[0])):
        means = {m: sum(r["score"] for r in rs) / len(rs) for m, rs in by_mech.items()}
        base = means.get("softmax")
        for mech in sorted(means, key=lambda m: -means[m] if higher else means[m]):
            rs = by_mech[mech]
            delta = "" if base is None or mech == "softmax" else f"{means[mech] - base:+.3f}"
            params = (rs[0].get("extra") or {}).get("params")
            tps = sum((r.get("extra") or {}).get("tokens_per_s") or 0 for r in rs) / len(rs)
            out.append([pattern, task, preset, mech, metric, f"{means[mech]:.3f}", delta, len(rs),
                        params, f"{tps:,.0f}"])  # fmt: skip
        curves = []
        for mech, rs in sorted(by_mech.items()):
            pts = [(step, score) for step, _loss, score in (rs[0].get("extra") or {}).get("curve") or []]
            curves.append(Series(mech, pts, dashed=mech == "softmax"))
        caption = f"{pattern}, {preset} preset, the first seed's run"
        for i in range(0, len(curves), MAX_LINES):
            chart = Chart(f"{task}: {metric} while training", "step", str(metric), curves[i : i + MAX_LINES],
                          log_y=False, caption=caption)  # fmt: skip
            charts.append(render(chart))
    skipped = [[r.get("pattern"), (r.get("extra") or {}).get("task"), r["mechanism"], r["status"], r.get("reason")]
               for r in q if r["status"] != "ok"]  # fmt: skip
    headers = ["pattern", "task", "preset", "mechanism", "metric", "score", "vs softmax", "seeds", "parameters",
               "tokens/s"]  # fmt: skip
    note = ("<p>Small models trained from scratch on each task: the same backbone, data, steps, seed and learning"
            " rate for every mechanism. Score: the task's metric on its test data (mean over seeds; for"
            " bits_per_byte lower is better).</p>")  # fmt: skip
    return (note + table(headers, out) + '<div class="charts">' + "".join(charts) + "</div>"
            + (table(["pattern", "task", "mechanism", "status", "why"], skipped) if skipped else ""))  # fmt: skip
