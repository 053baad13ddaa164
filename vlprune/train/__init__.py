"""``vlprune-train METHOD`` (or ``python -m vlprune.train METHOD``): train a learned method's weights.

Each trainable method has a module here with ``add_arguments(parser)`` and ``run(args)``; it writes a
folder that ``vlprune.patch(model, METHOD, weights=FOLDER)`` loads (see ``vlprune.learned``). By default
they train for the embedded model on its synthetic scenes, on the CPU.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from pathlib import Path
from typing import Callable

#: trainable method -> its training module
TRAINERS = {"atp": "vlprune.train.atp", "dyvte": "vlprune.train.dyvte", "tokenflex": "vlprune.train.tokenflex"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + f"\n\ntrainable methods: {', '.join(sorted(TRAINERS))}")
        return 0 if argv else 2
    name = argv[0]
    if name not in TRAINERS:
        print(f"vlprune-train: error: METHOD must be one of {', '.join(sorted(TRAINERS))}; got {name!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(TRAINERS[name])
    ap = argparse.ArgumentParser(prog=f"vlprune-train {name}", description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the weights folder (an existing one resumes)")
    ap.add_argument("--threads", type=int, default=2)
    module.add_arguments(ap)
    args = ap.parse_args(argv[1:])
    import torch

    torch.set_num_threads(args.threads)
    module.run(args)
    return 0


class Log:
    """Progress lines, timestamped, to stdout and appended to a training folder's ``train.log``."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, msg: str):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def eta(done: int, total: int, t0: float) -> str:
    """Minutes left when ``done`` of ``total`` units took the time since ``t0``."""
    if done == 0:
        return "?"
    left = (time.time() - t0) / done * (total - done)
    return f"{left / 60:.1f} min"


def data_arguments(ap) -> None:
    """Where a trainer's examples come from: the embedded model's tower features, or ``--model`` + a JSONL."""
    ap.add_argument("--data", type=Path, default=Path("/tmp/vlprune_embedded"),
                    help="tower features written by `python -m vlprune.embedded.features --out DIR`; with "
                         "--model, a JSONL of {\"image\": path, \"question\", \"answer\"}")
    ap.add_argument("--model", default=None,
                    help="a Hugging Face VLM (hub id or folder; needs --data FILE.jsonl) - default: the embedded model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--examples", type=int, default=20000, help="with --model: prompts read from --data")


def step_arguments(ap, *, steps: int, batch: int, lr: float, warmup: int, save_every: int, log_every: int,
                   batch_help: str) -> None:
    """The options of a step-based trainer (``fit``), with that trainer's defaults."""
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch", type=int, default=batch, help=batch_help)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--save-every", type=int, default=save_every)
    ap.add_argument("--stop-at", type=int, default=0,
                    help="stop after this step with a checkpoint (the same command without it resumes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=log_every)


def check_positive(args, *names: str) -> None:
    """A clear error for a count option below 1 (and a negative ``--stop-at``), before any model loads."""
    from ..errors import VlpruneError

    for name in names:
        if getattr(args, name) < 1:
            raise VlpruneError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if getattr(args, "stop_at", 0) < 0:
        raise VlpruneError(f"--stop-at must be >= 0 (0: run all --steps); got {args.stop_at}")


def fit(args, tensors: dict, step: Callable, log: Log, start: str) -> float | None:
    """Train ``tensors`` with AdamW (linear warm-up, cosine decay, gradient norm clipped at 1) for
    ``args.steps`` steps of ``step(rng) -> (loss, {name: float shown in the log})``, resumable: a checkpoint
    (tensors, optimiser, random state, step, time) goes to ``args.out/checkpoint.pt`` every ``--save-every``
    steps and at ``--stop-at``. Returns the minutes spent over all runs, or None when stopped early."""
    import numpy as np
    import torch

    opt = torch.optim.AdamW(tensors.values(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    done, spent = 0, 0.0
    ckpt = args.out / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        with torch.no_grad():
            for k, v in state["params"].items():
                tensors[k].copy_(v)
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state, done, spent = state["rng"], state["step"], state["seconds"]
        log(f"resumed at step {done}")
    else:
        log(start)
    t0, first, avg = time.time(), done, {}
    stop = min(args.steps, args.stop_at or args.steps)
    while done < stop:
        lr = args.lr * min(1.0, (done + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * done / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        loss, shown = step(rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(tensors.values()), 1.0)
        opt.step()
        done += 1
        avg = {k: v if k not in avg else 0.9 * avg[k] + 0.1 * v for k, v in shown.items()}  # smoothed for the log
        if done % args.log_every == 0 or done == args.steps:
            log(f"step {done}/{args.steps} " + " ".join(f"{k} {v:.3f}" for k, v in avg.items()) +
                f" lr {lr:.1e} - {(time.time() - t0) / (done - first):.2f} s/step, "
                f"ETA {eta(done - first, args.steps - first, t0)}")
        if done % args.save_every == 0 or done == stop:
            torch.save({"params": {k: v.detach() for k, v in tensors.items()}, "opt": opt.state_dict(),
                        "rng": rng.bit_generator.state, "step": done, "seconds": spent + time.time() - t0}, ckpt)
    if done < args.steps:
        log(f"stopped at step {done} of {args.steps}; the same command without --stop-at resumes")
        return None
    return (spent + time.time() - t0) / 60


def jsonl_prompts(args) -> tuple[list[dict], list[dict]]:
    """(training, held-out) prompts of ``--data FILE.jsonl`` for a ``--model`` run: the first tenth (at least
    one) held out to validate, each a clear error before the model loads."""
    from ..errors import VlpruneError
    from .dyvte import read_jsonl

    if args.data.suffix != ".jsonl":
        raise VlpruneError(f"--model needs --data FILE.jsonl (one {{\"image\", \"question\", \"answer\"}} per line); "
                           f"got {str(args.data)!r}")
    data = read_jsonl(args.data, args.examples)
    held = max(1, len(data) // 10)
    if len(data) <= held:
        raise VlpruneError(f"--data {str(args.data)!r} needs at least 2 prompts (a tenth is held out); got {len(data)}")
    return data[held:], data[:held]


def draw_prompts(data: list, args, rng) -> list:
    """One step's ``--batch`` prompts (all, if fewer), drawn without replacement, in file order."""
    import numpy as np

    return [data[i] for i in np.sort(rng.choice(len(data), min(args.batch, len(data)), replace=False))]


def held_out_chunks(held_out: list, args):
    """The first ``--val`` held-out prompts in chunks of ``--batch``."""
    for a in range(0, min(len(held_out), args.val), args.batch):
        yield held_out[a:a + args.batch]


def answer_scores(batches) -> dict:
    """Answer-token loss and accuracy (teacher-forced) over ``batches`` of (logits, labels); -100 labels
    are not answers."""
    import torch
    import torch.nn.functional as F

    loss = hits = total = 0.0
    with torch.no_grad():
        for logits, labels in batches:
            sel = labels != -100
            loss += F.cross_entropy(logits.float()[sel], labels[sel], reduction="sum").item()
            hits += (logits.argmax(-1)[sel] == labels[sel]).sum().item()
            total += sel.sum().item()
    return {"loss": round(loss / total, 4), "token_accuracy": round(hits / total, 4)}
