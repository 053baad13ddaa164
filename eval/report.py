"""What ``vlprune-eval`` writes from its finished cells: a tidy CSV/JSONL, a Markdown table in the papers'
layout and plots. Everything is rebuilt from the cell records each time, so a resumed or partly failed
sweep always shows exactly what is on disk.

The table follows the papers (e.g. FlowCut Table 1): one block per budget, one row per method, one
column per task (its primary metric, ``sweep.PRIMARY``; the CSV has every metric), and last the average
over tasks of each value as a percentage of the unpruned model's. The model-free "objects kept" column,
when present, is shown but not averaged (it is not an accuracy).
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

COLUMNS = ["model", "method", "budget", "ratio", "keep", "kept_tokens", "task", "metric", "value",
           "pct_of_unpruned", "prefill_ms", "status", "error"]


def fmt(value) -> str:
    """One formatting for the CSV and the table, so their numbers are the same strings."""
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{round(value, 4):g}" if abs(value) < 1e5 else f"{value:.1f}"
    return str(value)


def rows(records: list[dict], model: str) -> list[dict]:
    """Tidy rows: one per (cell, task, metric); a failed cell is one row with its error."""
    base = next((r for r in records if r.get("key") == "unpruned" and r.get("status") == "ok"), None)
    base_metrics = base["metrics"] if base else {}
    out = []
    for rec in records:
        cell = rec.get("cell", {})
        common = {"model": model, "method": cell.get("method") or "unpruned", "budget": rec.get("budget", ""),
                  "ratio": cell.get("ratio"), "keep": cell.get("keep"), "kept_tokens": rec.get("kept_tokens"),
                  "prefill_ms": rec.get("prefill_ms"), "status": rec.get("status", "")}
        if rec.get("status") != "ok":
            out.append({**common, "task": "", "metric": "", "value": None, "pct_of_unpruned": None,
                        "error": (rec.get("error") or "").splitlines()[0][:500]})
            continue
        for task, metrics in rec["metrics"].items():
            for metric, value in metrics.items():
                ref = base_metrics.get(task, {}).get(metric)
                pct = round(100.0 * value / ref, 2) if ref not in (None, 0) else None
                out.append({**common, "task": task, "metric": metric, "value": round(float(value), 4),
                            "pct_of_unpruned": pct, "error": ""})
    return out


def primary_metric(task: str, metrics) -> str:
    from .sweep import PRIMARY

    metrics = list(metrics)
    return PRIMARY[task] if PRIMARY.get(task) in metrics else metrics[0]


def markdown(records: list[dict], model: str) -> str:
    from .sweep import OBJECTS_TASK

    table = rows(records, model)
    ok = [r for r in table if r["status"] == "ok"]
    tasks = list(dict.fromkeys(r["task"] for r in ok))
    columns = {t: primary_metric(t, [r["metric"] for r in ok if r["task"] == t]) for t in tasks}
    accuracy_tasks = [t for t in tasks if t != OBJECTS_TASK]
    header = ["method", "visual tokens", *[f"{t} ({m})" for t, m in columns.items() if t != OBJECTS_TASK]]
    if OBJECTS_TASK in columns:
        header.append("objects kept")
    header += ["prefill ms", "avg % of unpruned"]
    lines = [f"Model: `{model}`. Values: each task's primary metric (all metrics: results.csv); last column: "
             "the mean over tasks of value / unpruned value.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_budget: dict[str, list[dict]] = {}
    for rec in records:
        by_budget.setdefault(rec.get("budget", ""), []).append(rec)
    for budget, recs in by_budget.items():
        if budget != "unpruned":
            lines.append("| " + " | ".join([f"**{budget}**"] + [""] * (len(header) - 1)) + " |")
        for rec in recs:
            method = (rec.get("cell") or {}).get("method") or "unpruned"
            mine = {(r["task"], r["metric"]): r for r in table if r["method"] == method and r["budget"] == budget}
            if rec.get("status") != "ok":
                lines.append("| " + " | ".join([method, "", *["failed"] * (len(header) - 3), ""]) + " |")
                continue
            cells = [method, fmt(rec.get("kept_tokens"))]
            pcts = []
            for t in accuracy_tasks:
                r = mine.get((t, columns[t]))
                cells.append(fmt(r["value"]) if r else "")
                if r and r["pct_of_unpruned"] is not None:
                    pcts.append(r["pct_of_unpruned"])
            if OBJECTS_TASK in columns:
                r = mine.get((OBJECTS_TASK, columns[OBJECTS_TASK]))
                cells.append(fmt(r["value"]) if r else "")
            cells.append(fmt(rec.get("prefill_ms")))
            cells.append(f"{statistics.mean(pcts):.1f} %" if pcts else "")
            lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in table if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed cells (retried on the next run):"]
        lines += [f"- {r['method']} {r['budget']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def plots(records: list[dict], model: str, out: Path) -> list[Path]:
    """accuracy_<task>.png (primary metric vs visual tokens kept, one line per method, the unpruned model
    dashed) and latency.png (prefill ms vs visual tokens kept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [r for r in rows(records, model) if r["status"] == "ok" and r["kept_tokens"] is not None]
    written = []
    tasks = list(dict.fromkeys(r["task"] for r in table))
    series = [(t, primary_metric(t, [r["metric"] for r in table if r["task"] == t])) for t in tasks]
    latency = {}
    for r in table:
        latency[(r["method"], r["budget"])] = (r["kept_tokens"], r["prefill_ms"])
    for task, metric in series + [("latency", "prefill_ms")]:
        fig, ax = plt.subplots(figsize=(6, 4))
        if task == "latency":
            points = [(m, k, v) for (m, _b), (k, v) in latency.items() if v is not None]
        else:
            points = [(r["method"], r["kept_tokens"], r["value"]) for r in table
                      if r["task"] == task and r["metric"] == metric]
        if not points:
            plt.close(fig)
            continue
        for method in dict.fromkeys(p[0] for p in points):
            xy = sorted((k, v) for m, k, v in points if m == method)
            if method == "unpruned":
                ax.axhline(xy[0][1], color="black", linestyle="--", linewidth=1, label="unpruned")
                ax.plot(*zip(*xy), "k*")
            else:
                ax.plot(*zip(*xy), marker="o", label=method)
        ax.set_xlabel("visual tokens kept per image")
        ax.set_ylabel("prefill ms (median)" if task == "latency" else metric)
        ax.set_title(f"{model}: {'prefill latency' if task == 'latency' else task}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
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
