"""Train TokenFLEX's feature weighting on a frozen VLM (default: the embedded model's training features).

Each step pools every image's patch features to a token count drawn at random from ``--counts`` (the
paper's dynamic token training; one count gives the fixed-count baseline it is compared with), weighs
them with the SwiGLU block, and trains that block alone on the answers' cross-entropy through the frozen
projector and LM; every image carries several of its scene's questions, as the embedded model was trained.
Resumable from ``--out`` (a checkpoint every ``--save-every`` steps); it writes ``config.json`` +
``model.safetensors`` (``vlprune.patch(model, "tokenflex", weights=OUT, keep=64)``), ``train.log`` and
``train_log.json`` (arguments, validation loss and answer-token accuracy at each count, time).

The features are the frozen tower's, computed once: ``python -m vlprune.embedded.features --out DIR``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import learned
from ..builtin_methods.tokenflex import init_tensors, pooling, weigh
from ..errors import VlpruneError
from . import Log, eta


def add_arguments(ap) -> None:
    ap.add_argument("--data", type=Path, default=Path("/tmp/vlprune_embedded"),
                    help="tower features written by `python -m vlprune.embedded.features --out DIR`")
    ap.add_argument("--counts", default="25,64,121",
                    help="visual-token counts drawn at random each step (one count: fixed-count training)")
    ap.add_argument("--eval-counts", default="25,64,121", help="counts the validation reports")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16, help="images per step")
    ap.add_argument("--questions", type=int, default=16, help="questions per image and step")
    ap.add_argument("--hidden", type=int, default=768, help="the SwiGLU's hidden width")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--val", type=int, default=200, help="validation scenes")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--stop-at", type=int, default=0,
                    help="stop after this step with a checkpoint (the same command without it resumes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=20)


def _counts(text: str, flag: str, n: int) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or any(not 1 <= c <= n for c in counts):
        raise VlpruneError(f"{flag} must be comma-separated token counts in 1..{n}; got {text!r}")
    return counts


def forward(model, batcher, feats, qa_lists, k: int, params: dict, grid: tuple[int, int]):
    """(logits, labels) of the frozen model on ``qa_lists`` with each image pooled to ``k`` weighed tokens."""
    from ..embedded.train import PREFIX

    m = model.model
    pooled = torch.einsum("kn,bnd->bkd", pooling(*grid, k), feats)
    proj = m.multi_modal_projector(weigh(pooled, params))
    ids, labels, mask, pos = batcher.build(qa_lists, k)
    embeds = m.get_input_embeddings()(ids)
    embeds[:, PREFIX:PREFIX + k] = proj.to(embeds.dtype)
    hidden = m.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
    return model.lm_head(hidden), labels


@torch.no_grad()
def validate(model, batcher, feats, recs, counts, params, grid) -> dict:
    """Answer-token loss and accuracy (teacher-forced) on the validation scenes at each count."""
    out = {}
    for k in counts:
        loss = hits = total = 0.0
        for start in range(0, len(recs), 50):
            qa = [recs[i]["qas"] for i in range(start, min(len(recs), start + 50))]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits, labels = forward(model, batcher, feats[start:start + len(qa)], qa, k, params, grid)
            sel = labels != -100
            loss += F.cross_entropy(logits.float()[sel], labels[sel], reduction="sum").item()
            hits += (logits.argmax(-1)[sel] == labels[sel]).sum().item()
            total += sel.sum().item()
        out[str(k)] = {"loss": round(loss / total, 4), "token_accuracy": round(hits / total, 4)}
    return out


def run(args) -> Path:
    from ..embedded import load_embedded
    from ..embedded.train import Batcher, load_split, scene_questions

    if not (args.data / "train_feats.npy").is_file():
        raise VlpruneError(f"--data {str(args.data)!r} holds no train_feats.npy; write the tower features with "
                           f"`python -m vlprune.embedded.features --out {args.data}`")
    feats, _, _, recs = load_split(args.data, "train")
    n = feats.shape[1]  # patch tokens per image, a square grid
    counts = _counts(args.counts, "--counts", n)
    eval_counts = _counts(args.eval_counts, "--eval-counts", n)
    for name in ("steps", "batch", "questions", "hidden", "val", "save_every", "warmup"):
        if getattr(args, name) < 1:
            raise VlpruneError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.stop_at < 0:
        raise VlpruneError(f"--stop-at must be >= 0 (0: run all --steps); got {args.stop_at}")
    side = math.isqrt(n)
    grid = (side, side)
    model, processor = load_embedded()
    model.requires_grad_(False)
    vfeats, _, _, vrecs = load_split(args.data, "val")
    vfeats, vrecs = torch.from_numpy(np.array(vfeats[:args.val])).float(), vrecs[:args.val]
    batcher = Batcher(processor.tokenizer)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "train.log")

    torch.manual_seed(args.seed)
    params = {k: v.requires_grad_(True) for k, v in init_tensors(feats.shape[-1], args.hidden).items()}
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    step, spent = 0, 0.0
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        with torch.no_grad():
            for k, v in state["params"].items():
                params[k].copy_(v)
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state, step, spent = state["rng"], state["step"], state["seconds"]
        log(f"resumed at step {step}")
    else:
        log(f"training tokenflex: {len(recs)} scenes, counts {counts}, args {vars(args)}")

    t0, first, avg = time.time(), step, None
    stop = min(args.steps, args.stop_at or args.steps)
    while step < stop:
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        k = counts[rng.integers(len(counts))]
        idx = np.sort(rng.choice(len(feats), args.batch, replace=False))
        qa = [scene_questions(recs[i]["objects"], rng, args.questions) for i in idx]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, labels = forward(model, batcher, torch.from_numpy(feats[idx]).float(), qa, k, params, grid)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        step += 1
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % args.log_every == 0 or step == args.steps:
            log(f"step {step}/{args.steps} loss {avg:.3f} lr {lr:.1e} - {(time.time() - t0) / (step - first):.2f} "
                f"s/step, ETA {eta(step - first, args.steps - first, t0)}")
        if step % args.save_every == 0 or step == stop:
            torch.save({"params": {k: v.detach() for k, v in params.items()}, "opt": opt.state_dict(),
                        "rng": rng.bit_generator.state, "step": step, "seconds": spent + time.time() - t0}, ckpt)
    if step < args.steps:
        log(f"stopped at step {step} of {args.steps}; the same command without --stop-at resumes")
        return out
    minutes = (spent + time.time() - t0) / 60
    val = validate(model, batcher, vfeats, vrecs, eval_counts, params, grid)
    log("val " + ", ".join(f"k={k}: loss {v['loss']:.3f} acc {v['token_accuracy']:.3f}" for k, v in val.items()))
    trained = {"args": {k: str(v) for k, v in vars(args).items()}, "counts": counts, "steps": step,
               "minutes": round(minutes, 1), "validation": val, "torch": torch.__version__}
    learned.save(out, "tokenflex", learned.signature(model), {k: v.detach() for k, v in params.items()}, trained=trained)
    (out / "train_log.json").write_text(json.dumps(trained, indent=1) + "\n")
    log(f"wrote {out} after {minutes:.1f} min")
    return out
