"""Held-out accuracy of the embedded model, unpruned and under ``vlprune.patch`` (greedy answers).

    python -m vlprune.embedded.evaluate --n 500 --methods fastervlm,random,uniform,pool --ratios 0.75,0.889 \
        --out assets/results/embedded-heldout

Every row is measured on the same held-out items (``scenes.test_items``), through the model's processor
and ``generate``, exactly as a user calls it. Two rows are not pruning settings: ``keep=1`` (one visual
token left: nearly no image) and ``prior`` (the most frequent training answer of each question, no model).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from . import scenes


@torch.inference_mode()
def answers(model, processor, items, batch: int = 16) -> list[str]:
    out = []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        inputs = processor(images=[it["image"] for it in chunk], text=[scenes.prompt(it["question"]) for it in chunk],
                           return_tensors="pt", padding=True)
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        new = ids[:, inputs["input_ids"].shape[1]:]
        out += [a.strip() for a in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


def by_answer(items, preds) -> dict[tuple[str, str], float]:
    """Accuracy per (question type, expected answer): where a model fails, not only how often."""
    hits: dict[tuple[str, str], list[bool]] = {}
    for it, p in zip(items, preds):
        hits.setdefault((it["qtype"], it["answer"]), []).append(p == it["answer"])
    return {key: sum(v) / len(v) for key, v in hits.items()}


def score(items, preds) -> dict:
    acc = {}
    for qt in scenes.QTYPES:
        sel = [p == it["answer"] for it, p in zip(items, preds) if it["qtype"] == qt]
        if sel:
            acc[qt] = sum(sel) / len(sel)
    acc["all"] = sum(p == it["answer"] for it, p in zip(items, preds)) / len(items)
    return acc


def prior_answers(items, n_train: int = 5000) -> list[str]:
    """The most frequent answer of each question text among the first training scenes (a no-image guess)."""
    counts: dict[str, Counter] = {}
    for i in range(n_train):
        for qa in scenes.train_scene(i).qas:
            counts.setdefault(qa.question, Counter())[qa.answer] += 1
    by_type: dict[str, Counter] = {}
    for q, c in counts.items():
        by_type.setdefault(q.split()[0] + q.split()[1], Counter()).update(c)
    out = []
    for it in items:
        c = counts.get(it["question"]) or by_type[it["question"].split()[0] + it["question"].split()[1]]
        out.append(c.most_common(1)[0][0])
    return out


@torch.inference_mode()
def objects_kept(model, processor, scene_list, method, batch: int = 8, min_cover: float = 0.25, **budget) -> float:
    """Model-free pruning metric: the share of annotated objects that keep at least one of their patches
    (a patch belongs to an object when the object covers ``min_cover`` of it). Reads the kept indices
    from ``handle.last``; the LM's output is not used."""
    import vlprune

    from .features import GRID

    kept_objects = total = 0
    with vlprune.pruned(model, method, **budget) as handle:
        for start in range(0, len(scene_list), batch):
            chunk = scene_list[start:start + batch]
            inputs = processor(images=[s.pil() for s in chunk], text=[scenes.prompt("what color is the circle ?")] *
                               len(chunk), return_tensors="pt", padding=True)
            model(**inputs)
            for sc, record in zip(chunk, handle.last):
                kept = set(record.kept.tolist())
                for mask in sc.masks:
                    cover = mask.reshape(GRID, scenes.PATCH, GRID, scenes.PATCH).mean(axis=(1, 3)).reshape(-1)
                    patches = set(np.flatnonzero(cover >= min_cover).tolist())
                    kept_objects += bool(patches & kept)
                    total += 1
    return kept_objects / max(total, 1)


def run(model, processor, items, methods, ratios, positions="contiguous", log=print, objects: int = 0):
    import vlprune

    rows = []
    object_scenes = list(scenes.split("test", objects)) if objects else []

    def add(name, ratio, preds, seconds, **extra):
        acc = score(items, preds)
        answers_acc = {f"{qt}={a}": v for (qt, a), v in by_answer(items, preds).items()}
        rows.append({"method": name, "ratio": ratio, "accuracy": acc, "by_answer": answers_acc,
                     "seconds": round(seconds, 1), **extra})
        kept = f"  objects kept {extra['objects_kept']:.3f}" if "objects_kept" in extra else ""
        log(f"{name:<12} {str(ratio):<6} " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()) + kept
            + f"  ({seconds:.0f} s)")

    t = time.time()
    add("unpruned", 0.0, answers(model, processor, items), time.time() - t)
    for method in methods:
        for ratio in ratios:
            t = time.time()
            handle = vlprune.patch(model, method, ratio=ratio, positions=positions)
            try:
                preds = answers(model, processor, items)
            finally:
                handle.remove()
            extra = {}
            if object_scenes:
                extra["objects_kept"] = objects_kept(model, processor, object_scenes, method, ratio=ratio)
            add(method, ratio, preds, time.time() - t, positions=positions, **extra)
    t = time.time()
    handle = vlprune.patch(model, "uniform", keep=1)
    try:
        preds = answers(model, processor, items)
    finally:
        handle.remove()
    add("keep=1", None, preds, time.time() - t)
    add("prior", None, prior_answers(items), 0.0)
    return rows


def markdown(rows, items, command: str) -> str:
    """The rows as a Markdown table (accuracy overall and per question type), with the command that made it."""
    types = [qt for qt in scenes.QTYPES if any(qt in r["accuracy"] for r in rows)]
    kept = any("objects_kept" in r for r in rows)
    head = ["method", "reduction", "all"] + types + (["objects kept"] if kept else [])
    lines = [f"Held-out accuracy of the embedded model, greedy answers to the first {len(items)} items of the test split "
             f"(`{command}`).", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = r["accuracy"]
        cells = [r["method"], "-" if r["ratio"] is None else f"{r['ratio']:g}", f"{acc['all']:.3f}"]
        cells += [f"{acc[qt]:.3f}" if qt in acc else "-" for qt in types]
        if kept:
            cells.append(f"{r['objects_kept']:.3f}" if "objects_kept" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + per_answer(rows, items)) + "\n"


def per_answer(rows, items) -> list[str]:
    """Accuracy per expected answer (a row per question type and answer, a column per setting), with n."""
    n = Counter(f"{it['qtype']}={it['answer']}" for it in items)
    keys = [f"{qt}={a}" for qt in scenes.QTYPES for a in scenes.ANSWERS[qt] if f"{qt}={a}" in n]
    names = [r["method"] if r["ratio"] in (None, 0.0) else f"{r['method']} {r['ratio']:g}" for r in rows]
    lines = ["Per expected answer (n = items with that answer):", "",
             "| type | answer | n | " + " | ".join(names) + " |", "|" + "---|" * (3 + len(names))]
    for key in keys:
        qt, a = key.split("=")
        lines.append(f"| {qt} | {a} | {n[key]} | " + " | ".join(f"{r['by_answer'][key]:.2f}" for r in rows) + " |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a checkpoint dir (default: the embedded model)")
    ap.add_argument("--n", type=int, default=500, help="held-out items (the first n of the test split)")
    ap.add_argument("--methods", default="fastervlm,random,uniform,pool")
    ap.add_argument("--ratios", default="0.75,0.889")
    ap.add_argument("--positions", default="contiguous", choices=["contiguous", "original"])
    ap.add_argument("--objects", type=int, default=0,
                    help="also measure the share of objects that keep a patch, on this many held-out scenes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="a folder for results.json and results.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from . import load_embedded

    model, processor = load_embedded(args.model)
    items = scenes.test_items(args.n)
    methods = [m for m in args.methods.split(",") if m]
    ratios = [float(r) for r in args.ratios.split(",") if r]
    rows = run(model, processor, items, methods, ratios, args.positions, log=lambda m: print(m, flush=True),
               objects=args.objects)
    if args.out:  # results.json + results.md (the README quotes the latter)
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python -m vlprune.embedded.evaluate " + shlex.join(argv if argv is not None else sys.argv[1:])
        (args.out / "results.json").write_text(json.dumps({
            "items": args.n, "split": "test", "seed": scenes.SEEDS["test"], "positions": args.positions,
            "command": command, "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
        (args.out / "results.md").write_text(markdown(rows, items, command))


if __name__ == "__main__":
    main()
