"""Tables and plot of a sweep: ``results.csv`` (one row per run), ``results.md`` and ``plot.png``
(one row or marker per grid point: mean over seeds, 95% t-interval, n, and the paired verdict against
the best point), ``examples.npz`` (per-example scores, for paired tests after the run folders are gone).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from ftlab.stats import PairedResult, Summary, summarize
from ftlab.sweep import compare
from ftlab.sweep.planning import show
from ftlab.sweep.spec import Run, Sweep

#: summary.json fields copied into results.csv after the metrics.
SUMMARY_FIELDS = (
    "params/trainable",
    "params/total",
    "params/trainable_pct",
    "perf/tokens_per_s",
    "perf/step_s",
    "perf/peak_mem_gib",
    "steps",
    "method",
    "objective",
)
#: Their column names where they differ: a grid axis is often called ``method`` itself.
RENAMED = {"method": "method_class", "objective": "objective_class"}
#: budget.json fields: what each run trained on.
BUDGET_FIELDS = ("samples", "tokens")


def _number(text: Any) -> Any:
    """A CSV cell back as int or float when it is one (rows carried over from an earlier results.csv)."""
    if not isinstance(text, str):
        return text
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return None if text == "" else text


def _row(sweep: Sweep, run: Run, metrics: dict[str, None]) -> dict[str, Any]:
    row: dict[str, Any] = {"run": run.label, "point": run.point.label, "seed": run.seed, **run.point.columns}
    path = run.result()
    info = run.info()
    previous = sweep.previous.get(run.label)
    if path is None and previous and sweep.finished(run):
        for k, v in previous.items():
            if k not in row:
                row[k] = _number(v)
                if "/" in k and k not in SUMMARY_FIELDS and k != "run_dir":
                    metrics[k] = None
        return row
    if path is None:
        code = info.get("returncode")
        row["status"] = "not run" if code is None else f"failed (exit {code})" if code else "no summary.json"
    else:
        summary = json.loads(path.read_text())
        row["status"] = "done"
        row["value"] = summary.get("metrics", {}).get(sweep.metric)
        for k, v in summary.get("metrics", {}).items():
            metrics[k] = None
            row[k] = v
        row.update({RENAMED.get(k, k): summary.get(k) for k in SUMMARY_FIELDS})
        budget = path.parent / "budget.json"
        if budget.exists():
            row.update({k: json.loads(budget.read_text()).get(k) for k in BUDGET_FIELDS})
        row["wall_s"] = info.get("wall_s")
    row["metric"] = sweep.metric
    row["config_sha"] = run.config_sha
    row["run_dir"] = str(run.run_dir)
    return row


def rows(sweep: Sweep) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of results.csv: one row per run (point x seed), in grid then seed order."""
    metrics: dict[str, None] = {}
    table = [_row(sweep, run, metrics) for run in sweep.runs]
    logged = sorted(k for k in metrics if k != sweep.metric and k not in SUMMARY_FIELDS)  # perf/* are in both
    summary = [RENAMED.get(k, k) for k in SUMMARY_FIELDS]
    columns = [
        "run",
        "point",
        "seed",
        *swept(sweep),
        "status",
        "metric",
        "value",
        *logged,
        *summary,
        *BUDGET_FIELDS,
        "wall_s",
        "config_sha",
        "run_dir",
    ]
    return columns, table


def swept(sweep: Sweep) -> list[str]:
    """The swept columns, in grid order (points may set different keys: a point leaves the others at base)."""
    return list(dict.fromkeys(c for p in sweep.points for c in p.columns))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    return "" if value is None else str(value)


def _spread(values: list[Any]) -> Any:
    """One value if all runs agree (steps, samples...), else ``min–max``."""
    values = [v for v in values if v is not None and v != ""]
    if not values:
        return None
    return values[0] if len(set(values)) == 1 else f"{_fmt(min(values))}–{_fmt(max(values))}"


def _median(values: list[Any]) -> float | None:
    values = sorted(float(v) for v in values if isinstance(v, (int, float)))
    return values[len(values) // 2] if values else None


def aggregate(sweep: Sweep, table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per grid point: its swept values, the metric's ``Summary`` over finished seeds, the
    paired verdict against the best point, medians of speed and memory, and the budget runs had."""
    examples = compare.collect(sweep)
    by_point: dict[str, list[dict[str, Any]]] = {}
    for r in table:
        by_point.setdefault(r["point"], []).append(r)
    summaries: dict[str, Summary] = {}
    for label, runs in by_point.items():
        values = [
            r["value"] for r in runs if r.get("status") == "done" and isinstance(r.get("value"), (int, float))
        ]
        if values:
            summaries[label] = summarize(values)
    best, versus = compare.versus_best({k: s.mean for k, s in summaries.items()}, examples, sweep.goal)
    out = []
    for point in sweep.points:
        runs = by_point.get(point.label, [])
        done = [r for r in runs if r.get("status") == "done"]
        agg: dict[str, Any] = {
            "point": point.label,
            **point.columns,
            "summary": summaries.get(point.label),
            "n": len(done) if len(done) == len(runs) else f"{len(done)}/{len(runs)}",
        }
        agg["versus"] = "best" if point.label == best else versus.get(point.label)
        for key in ("params/trainable_pct", "perf/tokens_per_s", "perf/peak_mem_gib"):
            agg[key] = _median([r.get(key) for r in done])
        for key in ("steps", *BUDGET_FIELDS):
            agg[key] = _spread([r.get(key) for r in done])
        out.append(agg)
    if examples:
        compare.save(sweep, examples)
    return out


def verdict(sweep: Sweep, versus: Any) -> tuple[str, str]:
    """(difference with its interval, verdict) of a point against the best, for the table."""
    if versus == "best":
        return "", "**best**"
    if not isinstance(versus, PairedResult):
        return "", versus or ""
    diff = (
        f"{100 * versus.diff:+.2f} [{100 * versus.low:+.2f}, {100 * versus.high:+.2f}]"
        if sweep.metric.endswith(("accuracy", "f1", "exact_match"))
        else f"{versus.diff:+.4g} [{versus.low:+.4g}, {versus.high:+.4g}]"
    )
    worse = versus.high < 0 if sweep.goal == "max" else versus.low > 0
    better = versus.low > 0 if sweep.goal == "max" else versus.high < 0
    text = "worse" if worse else "better on shared seeds" if better else "≈ best"
    return diff, f"{text} (p={versus.p:.2g})"


def _percent(metric: str) -> bool:
    return metric.endswith(("accuracy", "f1", "exact_match"))


def markdown(sweep: Sweep, points: list[dict[str, Any]]) -> str:
    """``results.md``: one row per grid point."""
    pct = _percent(sweep.metric)
    unit = " (%)" if pct else ""
    scale = 100 if pct else 1
    heads = [
        *swept(sweep),
        "n",
        f"{sweep.metric} mean{unit}",
        "sd",
        "95% CI",
        f"vs best: Δ [95% CI]{' (points)' if pct else ''}",
        "verdict",
        "trainable %",
        "tokens/s",
        "peak GiB",
        "steps",
        "samples",
        "tokens",
    ]
    fixed = ", ".join(f"`{k}={show(v)}`" for k, v in sweep.fixed.items()) or "nothing"
    seeds = f"seeds {sweep.seeds}" if sweep.seeds else "one seed (the base config's)"
    budget = ", ".join(f"{k}: {v}" for k, v in sweep.budget.items()) or "the config's max_steps"
    setup = (
        f"Base: {', '.join(f'`{b}`' for b in sweep.base)}; fixed: {fixed}; metric: `{sweep.metric}` "
        f"({'higher' if sweep.goal == 'max' else 'lower'} is better); {seeds}; budget: {budget}."
    )
    legend = (
        "Mean and sample sd over seeds, 95% Student-t interval of the mean. `vs best`: the point minus "
        "the best point (best mean), paired over the seeds both have and the validation examples, 95% "
        "paired-bootstrap interval and p-value (10,000 draws resampling seeds and examples); `≈ best` "
        "when the interval contains 0. Each point is tested against the best without a correction for "
        "multiple comparisons. tokens/s and peak memory: medians over seeds (comparable only between "
        "runs that had the machine to themselves); steps, samples, tokens: what each run trained on "
        "(non-padding tokens; a range when seeds differ)."
    )
    lines = [
        f"# Sweep `{sweep.name}`",
        "",
        setup,
        "",
        legend,
        "",
        "| " + " | ".join(heads) + " |",
        "|" + "---|" * len(heads),
    ]
    for p in points:
        s: Summary | None = p["summary"]
        diff, word = verdict(sweep, p["versus"])
        cells = [*(p.get(c, "") for c in swept(sweep)), p["n"]]
        if s is None:
            cells += ["", "", "", "", "", *[""] * 6]
        else:
            cells += [
                f"{scale * s.mean:.2f}" if pct else _fmt(s.mean),
                "" if math.isnan(s.std) else (f"{scale * s.std:.2f}" if pct else _fmt(s.std)),
                ""
                if math.isnan(s.low)
                else (
                    f"[{scale * s.low:.2f}, {scale * s.high:.2f}]"
                    if pct
                    else f"[{_fmt(s.low)}, {_fmt(s.high)}]"
                ),
                diff,
                word,
                _fmt(p["params/trainable_pct"]),
                _fmt(p["perf/tokens_per_s"]),
                _fmt(p["perf/peak_mem_gib"]),
                _fmt(p["steps"]),
                _fmt(p["samples"]),
                _fmt(p["tokens"]),
            ]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def report(sweep: Sweep) -> None:
    """Write ``results.csv``, ``results.md``, ``plot.png`` (and ``examples.npz``) into ``sweep.out``."""
    columns, table = rows(sweep)
    sweep.out.mkdir(parents=True, exist_ok=True)
    with open(sweep.out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    points = aggregate(sweep, table)
    (sweep.out / "results.md").write_text(markdown(sweep, points))
    plot(sweep, table, points)


def plot(sweep: Sweep, table: list[dict[str, Any]], points: list[dict[str, Any]]) -> Path:
    """Mean and 95% interval per point (seeds as small dots): against the first swept key when it is
    numeric (a line per value of the others), else one row per point. Points worse than the best in
    the paired test are drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = swept(sweep)
    done = [p for p in points if p["summary"] is not None]
    runs = {}
    for r in table:
        if r.get("status") == "done" and isinstance(r.get("value"), (int, float)):
            runs.setdefault(r["point"], []).append(float(r["value"]))
    x_key = columns[0] if columns else "point"
    xs = [_number(p.get(x_key)) for p in done]
    fig, ax = plt.subplots(
        figsize=(
            6.4,
            max(3.2, 1.2 + 0.38 * len(done))
            if not all(isinstance(x, (int, float)) for x in xs) or not done
            else 4.0,
        ),
        dpi=120,
    )

    def err(p):
        s = p["summary"]
        return 0.0 if math.isnan(s.low) else s.half_width

    def hollow(p):
        return isinstance(p["versus"], PairedResult) and verdict(sweep, p["versus"])[1].startswith("worse")

    if done and all(isinstance(x, (int, float)) for x in xs):
        series: dict[str, list[tuple[float, dict]]] = {}
        for p, x in zip(done, xs):
            others = " ".join(f"{k}={p[k]}" for k in columns[1:] if k in p)
            series.setdefault(others, []).append((float(x), p))
        for i, (name, pts) in enumerate(series.items()):
            pts.sort(key=lambda t: t[0])
            colour = f"C{i}"
            ax.errorbar(
                [x for x, _ in pts],
                [p["summary"].mean for _, p in pts],
                yerr=[err(p) for _, p in pts],
                color=colour,
                marker="o",
                capsize=3,
                label=name or None,
                mfc=colour,
            )
            for x, p in pts:
                ax.plot([x] * len(runs[p["point"]]), runs[p["point"]], ".", color=colour, alpha=0.35)
                if hollow(p):
                    ax.plot([x], [p["summary"].mean], "o", mfc="white", color=colour, zorder=4)
        if min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
        if len(set(xs)) <= 12:
            ax.set_xticks(sorted(set(xs)), [_fmt(x) for x in sorted(set(xs))])
        if len(series) > 1:
            ax.legend(fontsize=8)
        ax.set_xlabel(x_key)
        ax.set_ylabel(f"{sweep.metric} (mean, 95% CI)")
    else:  # categories: a marker per point (bars from zero would hide the differences that matter)
        for i, p in enumerate(done):
            s = p["summary"]
            ax.errorbar(
                [s.mean],
                [i],
                xerr=[err(p)],
                fmt="o",
                color="C0",
                capsize=3,
                zorder=3,
                mfc="white" if hollow(p) else "C0",
            )
            ax.plot(runs[p["point"]], [i] * len(runs[p["point"]]), ".", color="C0", alpha=0.35)
            ax.annotate(_fmt(s.mean), (s.mean, i), xytext=(4, 5), textcoords="offset points", fontsize=7)
        ax.set_yticks(range(len(done)), [p["point"] for p in done], fontsize=8)
        if done:
            ax.set_ylim(len(done) - 0.5, -0.5)
        ax.set_xlabel(f"{sweep.metric} (mean, 95% CI; dots: seeds; hollow: below the best)")
        ax.locator_params(axis="x", nbins=5)
    n = f", {len(sweep.seeds)} seeds" if sweep.seeds else ""
    ax.set_title(
        f"{sweep.name}: {sweep.metric}{n}" + ("" if done else " (no finished runs yet)"), fontsize=10
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = sweep.out / "plot.png"
    fig.savefig(path)
    plt.close(fig)
    return path
