"""What ``vlprune-eval`` writes from its finished cells: a tidy CSV/JSONL, a Markdown table in the papers'
layout and plots. Everything is rebuilt from the cell records each time, so a resumed or partly failed
sweep always shows exactly what is on disk.

The table follows the papers (e.g. FlowCut Table 1): one block per budget, one row per method, one
column per task (its primary metric, ``PRIMARY``; the CSV has every metric), and last the average over
tasks of each value as a percentage of the unpruned model's. Values carry lmms-eval's standard error
(``±``) and the column its number of items ``n``, so a difference within the noise reads as such. The
model-free "objects kept" column, when present, is shown but not averaged (it is not an accuracy).
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

OBJECTS_TASK = "scenes_objects"  # the model-free "objects kept" metric's pseudo task
#: the metric a task's column shows in the Markdown table and the plots (others are in the CSV)
PRIMARY = {"vlprune_scenes": "accuracy", "pope": "pope_accuracy", "mme": "mme_perception_score",
           "gqa": "exact_match", "textvqa_val": "exact_match", "vqav2_val": "exact_match",
           "scienceqa_img": "exact_match", "mmbench_en_dev": "gpt_eval_score", OBJECTS_TASK: "objects_kept"}
COLUMNS = ["model", "method", "options", "budget", "ratio", "keep", "kept_tokens", "task", "metric", "value",
           "stderr", "n", "pct_of_unpruned", "prefill_ms", "status", "error"]
#: one colour and one marker per method, fixed by its place among the registered methods, so that a
#: method looks the same in every plot: matplotlib's ten default colours, then ten more that stay apart
#: from them and readable on white (black is the unpruned model's)
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000075", "#800000", "#e6ab02", "#008080", "#f032e6", "#6a3d9a", "#9acd32", "#a0522d",
           "#4682b4", "#ff4500"]
MARKERS = ["o", "s", "D", "^", "v", "P", "X", "*", "p", "h", "<", ">", "d", "8", "H", "x", "1", "2", "3", "4"]


def fmt(value) -> str:
    """One formatting for the CSV and the table, so their numbers are the same strings."""
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{round(value, 4):g}" if abs(value) < 1e5 else f"{value:.1f}"
    return str(value)


def _settings(cell: dict) -> str:
    words = [f"{k}={v}" for k, v in sorted((cell.get("options") or {}).items())]
    if cell.get("positions") not in (None, "contiguous"):
        words.append(f"positions={cell['positions']}")
    return " ".join(words)


def rows(records: list[dict], model: str) -> list[dict]:
    """Tidy rows: one per (cell, task, metric); a failed cell is one row with its error."""
    base = next((r for r in records if r.get("key") == "unpruned" and r.get("status") == "ok"), None)
    base_metrics = base["metrics"] if base else {}
    out = []
    for rec in records:
        cell = rec.get("cell", {})
        common = {"model": model, "method": cell.get("method") or "unpruned", "options": _settings(cell),
                  "budget": rec.get("budget", ""), "ratio": cell.get("ratio"), "keep": cell.get("keep"),
                  "kept_tokens": rec.get("kept_tokens"), "prefill_ms": rec.get("prefill_ms"),
                  "status": rec.get("status", "")}
        if rec.get("status") != "ok":
            out.append({**common, "task": "", "metric": "", "value": None, "stderr": None, "n": None,
                        "pct_of_unpruned": None, "error": (rec.get("error") or "").splitlines()[0][:500]})
            continue
        for task, metrics in rec["metrics"].items():
            for metric, value in metrics.items():
                ref = base_metrics.get(task, {}).get(metric)
                pct = round(100.0 * value / ref, 2) if ref not in (None, 0) else None
                stderr = (rec.get("stderr") or {}).get(task, {}).get(metric)
                out.append({**common, "task": task, "metric": metric, "value": round(float(value), 4),
                            "stderr": None if stderr is None else round(float(stderr), 4),
                            "n": (rec.get("n") or {}).get(task), "pct_of_unpruned": pct, "error": ""})
    return out


def primary_metric(task: str, metrics) -> str:
    metrics = list(metrics)
    return PRIMARY[task] if PRIMARY.get(task) in metrics else metrics[0]


def _one_n(rows_of_task: list[dict]):
    """The task's n when every cell scored the same number of items, else None (then each value shows it)."""
    sizes = {r["n"] for r in rows_of_task}
    return sizes.pop() if len(sizes) == 1 else None


def markdown(records: list[dict], model: str) -> str:
    table = rows(records, model)
    ok = [r for r in table if r["status"] == "ok"]
    tasks = list(dict.fromkeys(r["task"] for r in ok))
    columns = {t: primary_metric(t, [r["metric"] for r in ok if r["task"] == t]) for t in tasks}
    sizes = {t: _one_n([r for r in ok if r["task"] == t]) for t in tasks}
    accuracy_tasks = [t for t in tasks if t != OBJECTS_TASK]
    header = ["method", "visual tokens",
              *[f"{t} ({m}{f', n={sizes[t]}' if sizes[t] else ''})" for t, m in columns.items() if t != OBJECTS_TASK]]
    if OBJECTS_TASK in columns:
        header.append("objects kept")
    header += ["prefill ms", "avg % of unpruned"]
    lines = [f"Model: `{model}`. Values: each task's primary metric (all metrics: results.csv); last column: "
             "the mean over tasks of value / unpruned value.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_budget: dict[str, list[dict]] = {}
    for rec in records:
        by_budget.setdefault(rec.get("budget", ""), []).append(rec)

    def value(r, task):
        text = fmt(r["value"])
        if r["stderr"] is not None:
            text += f" ± {fmt(r['stderr'])}"
        if r["n"] is not None and sizes.get(task) is None:
            text += f" (n={r['n']})"
        return text

    for budget, recs in by_budget.items():
        if budget != "unpruned":
            lines.append("| " + " | ".join([f"**{budget}**"] + [""] * (len(header) - 1)) + " |")
        for rec in recs:
            cell = rec.get("cell") or {}
            method = cell.get("method") or "unpruned"
            label = " ".join(filter(None, [method, _settings(cell)]))
            mine = {(r["task"], r["metric"]): r for r in table if r["method"] == method and r["budget"] == budget
                    and r["options"] == _settings(cell)}
            if rec.get("status") != "ok":
                lines.append("| " + " | ".join([label, "", *["failed"] * (len(header) - 3), ""]) + " |")
                continue
            cells = [label, fmt(rec.get("kept_tokens"))]
            pcts = []
            for t in accuracy_tasks:
                r = mine.get((t, columns[t]))
                cells.append(value(r, t) if r else "")
                if r and r["pct_of_unpruned"] is not None:
                    pcts.append(r["pct_of_unpruned"])
            if OBJECTS_TASK in columns:
                r = mine.get((OBJECTS_TASK, columns[OBJECTS_TASK]))
                cells.append(fmt(r["value"]) if r else "")
            cells.append(fmt(rec.get("prefill_ms")))
            cells.append(f"{statistics.mean(pcts):.1f} %" if pcts else "")
            lines.append("| " + " | ".join(cells) + " |")
    if any(r["stderr"] is not None for r in ok):
        lines += ["", "± is one standard error of the value (lmms-eval's, over the n items scored): two values "
                  "closer than about twice their ± are not told apart by this many items."]
    failed = [r for r in table if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed cells (retried on the next run):"]
        lines += [f"- {' '.join(filter(None, [r['method'], r['options']]))} {r['budget']}: {r['error']}"
                  for r in failed]
    return "\n".join(lines) + "\n"


def style(method: str) -> tuple[str, str]:
    """(colour, marker) of a method: fixed by its index among the registered methods (others after them),
    distinct for the first 20, the same in every plot."""
    from vlprune.registry import method_names

    names = method_names()
    i = names.index(method) if method in names else len(names) + sum(map(ord, method)) % 20
    return COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)]


def plots(records: list[dict], model: str, out: Path) -> list[Path]:
    """accuracy_<task>.png (primary metric ± standard error vs visual tokens kept on a log axis, one colour
    and marker per method, nudged sideways so equal budgets do not hide each other; the unpruned model a
    dashed line with its ± band) and latency.png (prefill ms vs visual tokens kept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [r for r in rows(records, model) if r["status"] == "ok" and r["kept_tokens"] is not None]
    written = []
    tasks = list(dict.fromkeys(r["task"] for r in table))
    series = [(t, primary_metric(t, [r["metric"] for r in table if r["task"] == t])) for t in tasks]
    latency = {}
    for r in table:
        latency[(r["method"], r["budget"], r["options"])] = r
    for task, metric in series + [("latency", "prefill_ms")]:
        if task == "latency":
            points = [(r["method"], r["kept_tokens"], r["prefill_ms"], None, r["options"]) for r in latency.values()
                      if r["prefill_ms"] is not None]
            n = None
        else:
            mine = [r for r in table if r["task"] == task and r["metric"] == metric]
            points = [(r["method"], r["kept_tokens"], r["value"], r["stderr"], r["options"]) for r in mine]
            n = _one_n(mine)
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        methods = [m for m in dict.fromkeys((p[0], p[4]) for p in points) if m[0] != "unpruned"]
        for j, (method, options) in enumerate(methods):
            xyz = sorted((k, v, e) for m, k, v, e, o in points if (m, o) == (method, options))
            nudge = 2 ** (0.05 * (j - (len(methods) - 1) / 2))  # same budget, several methods: side by side
            colour, marker = style(method)
            ax.errorbar([k * nudge for k, _, _ in xyz], [v for _, v, _ in xyz],
                        yerr=[float("nan") if e is None else e for _, _, e in xyz], color=colour, marker=marker,
                        markersize=6, capsize=2, linewidth=1.2, alpha=0.9,
                        label=" ".join(filter(None, [method, options])))
        for _m, k, v, e, _o in (p for p in points if p[0] == "unpruned"):
            ax.axhline(v, color="black", linestyle="--", linewidth=1, label="unpruned")
            if e:
                ax.axhspan(v - e, v + e, color="black", alpha=0.08, linewidth=0)
            ax.plot([k], [v], "k*", markersize=9)
        ticks = sorted({p[1] for p in points})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [fmt(float(t)) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("visual tokens kept per image (log scale)")
        ax.set_ylabel("prefill ms (median)" if task == "latency" else f"{metric} (± 1 s.e.)")
        what = "prefill latency" if task == "latency" else task + (f", n={n} per point" if n else "")
        ax.set_title(f"{model}: {what}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        path = out / ("latency.png" if task == "latency" else f"accuracy_{task}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_all(out: Path, records: list[dict], model: str) -> list[Path]:
    """results.csv, results.jsonl, results.md and the plots, from the cell records."""
    out = Path(out)
    table = rows(records, model)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in table:
            w.writerow({k: fmt(r.get(k)) for k in COLUMNS})
    with open(out / "results.jsonl", "w") as f:
        for r in table:
            f.write(json.dumps(r) + "\n")
    (out / "results.md").write_text(markdown(records, model))
    try:
        images = plots(records, model, out)
    except ImportError:  # matplotlib is in the [eval] extra; without it the tables still get written
        images = []
    return [out / "results.csv", out / "results.jsonl", out / "results.md", *images]
