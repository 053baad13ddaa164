"""Learned and adaptive methods beside training-free ones at the same *average* visual-token budget.

    python -m vlprune.embedded.matched --n 500 --out assets/results/embedded-learned

An adaptive method keeps a different number of visual tokens per prompt and per decoder layer (``dyvte``:
all of them up to its exit layer, none after; ``atp``: its own count from each module's layer on), so its
cost is the number of visual tokens each LM layer sees, averaged over the layers, from each
``handle.last`` record. The training-free methods then run at the learned method's mean: encoder-stage
methods with ``keep`` = that mean, ``fastv`` (from its layer K on) with the ``keep`` that gives the same
mean, and ``visual_exit`` at every fixed layer. Every row answers the same held-out items one prompt at
a time (the released DyVTE runs one prompt at a time; in a batch it exits where every row votes) with
greedy ``generate``; accuracy with its standard error, tokens as mean and spread over items, and the LM's
work as the share of token-layers of the unpruned prompt. No wall-clock column: on this tiny model the
vision tower dominates prefill and single-prompt CPU timings vary by more than the LM saving
(``latency.md`` and the GPU benchmark time prefill).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch

from . import scenes


def visual_tokens_per_layer(record, depth: int) -> float:
    """The visual tokens of one image that the LM's layers see, averaged over its ``depth`` layers."""
    if record.layer is None:  # pruned before the LM (or not at all): every layer sees ``after``
        return float(record.after)
    counts = record.counts or {record.layer: record.after}  # several drops (atp), or one
    seen = [record.before] * depth
    for layer, count in counts.items():
        seen[layer:] = [count] * (depth - layer)
    return sum(seen) / depth


@torch.inference_mode()
def measure(model, processor, items, method=None, **options) -> dict:
    """One setting on ``items``, one prompt at a time: answers, tokens per layer, exit layers, LM work."""
    import vlprune

    depth = model.config.text_config.num_hidden_layers
    handle = vlprune.patch(model, method, **options) if method else None
    preds, tokens, layers, token_layers, counts = [], [], [], [], []
    try:
        for it in items:
            inputs = processor(images=[it["image"]], text=[scenes.prompt(it["question"])], return_tensors="pt")
            ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            new = ids[:, inputs["input_ids"].shape[1]:]
            preds.append(processor.tokenizer.batch_decode(new, skip_special_tokens=True)[0].strip())
            length = inputs["input_ids"].shape[1]
            if handle is None:
                n = int((inputs["input_ids"] == model.config.image_token_id).sum())
                tokens.append(float(n))
                token_layers.append(1.0)
                continue
            (record,) = handle.last
            per_layer = visual_tokens_per_layer(record, depth)
            tokens.append(per_layer)
            layers.append(record.layer)
            counts.append(record.counts)
            token_layers.append((length - record.before + per_layer) / length)
    finally:
        if handle is not None:
            handle.remove()
    hits = [p == it["answer"] for p, it in zip(preds, items)]
    acc = sum(hits) / len(hits)
    return {"method": method or "unpruned", "options": {k: v for k, v in options.items() if k != "weights"},
            "accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / len(hits)),
            "by_type": {qt: statistics.mean(h for h, it in zip(hits, items) if it["qtype"] == qt)
                        for qt in scenes.QTYPES if any(it["qtype"] == qt for it in items)},
            "tokens_mean": statistics.mean(tokens), "tokens_sd": statistics.pstdev(tokens),
            "exit_layers": dict(sorted(Counter(str(x) for x in layers).items())) if layers and not any(counts) else {},
            "per_layer": {str(k): [statistics.mean(c[k] for c in counts), statistics.pstdev(c[k] for c in counts)]
                          for k in counts[0]} if counts and counts[0] else {},
            "lm_token_layers": statistics.mean(token_layers)}


def settings(learned_rows: list[dict], depth: int, n_visual: int, fastv_layer: int = 2) -> list[tuple[str, dict]]:
    """The training-free settings matched to each learned row's mean tokens per layer."""
    out = [("visual_exit", {"layer": layer}) for layer in range(1, depth)]
    for row in learned_rows:
        keep = max(1, round(row["tokens_mean"]))
        out += [(m, {"keep": keep}) for m in ("divprune", "fastervlm", "uniform")]
        fastv_keep = round((row["tokens_mean"] * depth - fastv_layer * n_visual) / (depth - fastv_layer))
        if fastv_keep >= 1:
            out.append(("fastv", {"keep": fastv_keep, "layer": fastv_layer}))
    seen, unique = set(), []
    for name, opts in out:
        key = (name, tuple(sorted(opts.items())))
        if key not in seen:
            seen.add(key)
            unique.append((name, opts))
    return unique


def label(row) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in row["options"].items())
    return f"{row['method']}" + (f" ({opts})" if opts else "")


def markdown(rows, n: int, command: str, depth: int) -> str:
    types = list(rows[0]["by_type"])
    lines = [f"Accuracy (± its standard error) vs visual tokens per LM layer (mean ± standard deviation over items) "
             f"on {n} held-out items, one prompt at a time (`{command}`). Tokens per layer: the visual tokens each of "
             f"the {depth} decoder layers sees, averaged over layers. LM work: token-layers relative to the unpruned prompt. Exit layers: how many items "
             "dropped their image before each decoder layer (kept: never dropped); for atp, the tokens it keeps from each module's "
             "layer on (mean ± standard deviation over items).", "",
             "| setting | tokens per layer | all | " + " | ".join(types) + " | LM work | exit layers / kept from layer |",
             "|" + "---|" * (5 + len(types))]
    for r in rows:
        exits = ", ".join(f"{'kept' if k == 'None' else k}: {v}" for k, v in r["exit_layers"].items()) \
            or ", ".join(f"{k}: {m:.0f} ± {sd:.0f}" for k, (m, sd) in r.get("per_layer", {}).items()) or "-"
        lines.append(f"| {label(r)} | {r['tokens_mean']:.1f} ± {r['tokens_sd']:.1f} | {r['accuracy']:.3f} ± "
                     f"{r['stderr']:.3f} | " + " | ".join(f"{r['by_type'][t]:.2f}" for t in types)
                     + f" | {r['lm_token_layers'] * 100:.0f} % | {exits} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="held-out items (the first n of the test split)")
    ap.add_argument("--learned", default="dyvte", help="comma-separated learned methods (their shipped weights)")
    ap.add_argument("--thresholds", default="0.5,0.9", help="dyvte exit thresholds to run (0.5: as released)")
    ap.add_argument("--scales", default="1", help="atp threshold scales to run (1: as trained)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="a folder for results.json and results.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from . import load_embedded

    model, processor = load_embedded()
    items = scenes.test_items(args.n)
    depth = model.config.text_config.num_hidden_layers
    say = lambda m: print(m, flush=True)  # noqa: E731
    rows = [measure(model, processor, items)]
    n_visual = int(rows[0]["tokens_mean"])
    learned_rows = []
    for name in [m for m in args.learned.split(",") if m]:
        options = {"dyvte": [{"threshold": float(t)} for t in args.thresholds.split(",")],
                   "atp": [{"scale": float(t)} for t in args.scales.split(",")]}.get(name, [{}])
        for opts in options:
            learned_rows.append(measure(model, processor, items, name, **opts))
            say(f"{label(learned_rows[-1])}: {learned_rows[-1]['accuracy']:.3f} at {learned_rows[-1]['tokens_mean']:.1f}")
    rows += learned_rows
    for name, opts in settings(learned_rows, depth, n_visual):
        rows.append(measure(model, processor, items, name, **opts))
        say(f"{label(rows[-1])}: {rows[-1]['accuracy']:.3f} at {rows[-1]['tokens_mean']:.1f}")
    command = "python -m vlprune.embedded.matched " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"items": args.n, "command": command, "depth": depth,
                                                           "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
        (args.out / "results.md").write_text(markdown(rows, args.n, command, depth))
    return rows


if __name__ == "__main__":
    main()
