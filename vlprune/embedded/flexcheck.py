"""TokenFLEX's claim on the embedded model: one block trained at random counts vs one trained per count.

    python -m vlprune.embedded.flexcheck --n 500 --weights flex=DIR,fixed25=DIR,fixed64=DIR,fixed121=DIR \
        --out assets/results/embedded-tokenflex

Every named weights folder (written by ``vlprune-train tokenflex``; same steps and batch, only ``--counts``
differs) answers the same held-out items at each of ``--counts`` through ``vlprune.patch(model,
"tokenflex", weights=..., keep=k)``, beside the unpruned model, ``pool`` (the untrained block: plain
pooling to the same cells, for square counts up to the cell layout) and ``divprune`` (the best method that
prunes before the LM in the training-free sweep). ``--extra-counts`` runs the first weights and ``pool``
at counts none was trained at. Accuracy with its standard error.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch

from . import scenes
from .evaluate import answers, score


def measure(model, processor, items, method=None, **options) -> dict:
    import vlprune

    if method is None:
        preds = answers(model, processor, items)
    else:
        with vlprune.pruned(model, method, **options):
            preds = answers(model, processor, items)
    acc = score(items, preds)
    return {"accuracy": acc["all"], "stderr": math.sqrt(acc["all"] * (1 - acc["all"]) / len(items)),
            "by_type": {k: v for k, v in acc.items() if k != "all"}}


def markdown(table: dict, unpruned: dict, counts: list[int], n: int, command: str, budgets: dict) -> str:
    trained = "; ".join(f"{w}: {b}" for w, b in budgets.items())
    lines = [f"Held-out accuracy (± standard error, {n} items) at each visual-token count, of 256; unpruned "
             f"{unpruned['accuracy']:.3f} ± {unpruned['stderr']:.3f} (`{command}`). The blocks' training: {trained}.", "",
             "| setting | " + " | ".join(f"{k} tokens" for k in counts) + " |", "|---|" + "---|" * len(counts)]
    for name, cells in table.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{cells[str(k)]['accuracy']:.3f} ± {cells[str(k)]['stderr']:.3f}" if str(k) in cells else "-"
            for k in counts) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="held-out items (the first n of the test split)")
    ap.add_argument("--weights", required=True, help="NAME=FOLDER,... (the first: the block trained at random counts)")
    ap.add_argument("--counts", default="25,64,121")
    ap.add_argument("--extra-counts", default="16,36,100,144", help="counts no block was trained at")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    weights = dict(part.split("=", 1) for part in args.weights.split(","))
    counts = [int(c) for c in args.counts.split(",")]
    extra = [int(c) for c in args.extra_counts.split(",") if c]
    torch.set_num_threads(args.threads)
    from . import load_embedded

    model, processor = load_embedded()
    items = scenes.test_items(args.n)
    unpruned = measure(model, processor, items)
    table: dict[str, dict] = {}
    first = next(iter(weights))
    for name, method, opts, ks in ([("pool", "pool", {}, counts + extra), ("divprune", "divprune", {}, counts)]
                                   + [(f"tokenflex {w}", "tokenflex", {"weights": folder},
                                       counts + (extra if w == first else []))
                                      for w, folder in weights.items()]):
        table[name] = {}
        for k in ks:
            table[name][str(k)] = measure(model, processor, items, method, keep=k, **opts)
            print(f"{name} keep={k}: {table[name][str(k)]['accuracy']:.3f}", flush=True)
    budgets = {}
    for w, folder in weights.items():
        log = json.loads((Path(folder) / "train_log.json").read_text())
        budgets[w] = f"counts {', '.join(map(str, log['counts']))}, {log['steps']} steps, {log['minutes']} min"
    command = "python -m vlprune.embedded.flexcheck " + shlex.join(argv if argv is not None else sys.argv[1:])
    all_counts = sorted(set(counts + extra))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"items": args.n, "command": command, "budgets": budgets, "torch": torch.__version__,
                                                           "unpruned": unpruned, "table": table}, indent=1) + "\n")
        (args.out / "results.md").write_text(markdown(table, unpruned, all_counts, args.n, command, budgets))
    return table


if __name__ == "__main__":
    main()
