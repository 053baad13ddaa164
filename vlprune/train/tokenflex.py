"""Train TokenFLEX's feature weighting on a frozen VLM (default: the embedded model's training features).

Each step pools every image's patch features to a token count drawn at random from ``--counts`` (the
paper's dynamic token training; one count gives the fixed-count baseline it is compared with), weighs
them with the SwiGLU block, and trains that block alone on the answers' cross-entropy through the frozen
projector and LM; every image carries several of its scene's questions, as the embedded model was trained.
Resumable from ``--out`` (a checkpoint every ``--save-every`` steps); it writes ``config.json`` +
``model.safetensors`` (``vlprune.patch(model, "tokenflex", weights=OUT, keep=64)``), ``train.log`` and
``train_log.json`` (arguments, validation loss and answer-token accuracy at each count, time).

The features are the frozen tower's, computed once: ``python -m vlprune.embedded.features --out DIR``.
With ``--model`` (a Hugging Face LLaVA-style VLM, one square-grid image per prompt) it trains on a JSONL of
{"image", "question", "answer"} instead, through the patched model itself (``eval/recipes/tokenflex-llava15.md``),
holding out a tenth to validate.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import learned
from ..builtin_methods.tokenflex import init_tensors, pooling, weigh
from ..errors import VlpruneError
from . import Log, answer_scores, check_positive, data_arguments, fit, step_arguments


def add_arguments(ap) -> None:
    data_arguments(ap)
    ap.add_argument("--counts", default="25,64,121",
                    help="visual-token counts drawn at random each step (one count: fixed-count training)")
    ap.add_argument("--eval-counts", default="25,64,121", help="counts the validation reports")
    ap.add_argument("--questions", type=int, default=16, help="questions per image and step (embedded model)")
    ap.add_argument("--hidden", type=int, default=768, help="the SwiGLU's hidden width")
    ap.add_argument("--val", type=int, default=200, help="validation scenes (with --model: held-out prompts)")
    step_arguments(ap, steps=600, batch=16, lr=1e-3, warmup=30, save_every=100, log_every=20,
                   batch_help="images per step")


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


def run(args) -> Path:
    check_positive(args, "steps", "batch", "questions", "hidden", "val", "save_every", "warmup", "examples")
    counts = eval_counts = None

    def check(n):  # before the model loads
        nonlocal counts, eval_counts
        counts, eval_counts = _counts(args.counts, "--counts", n), _counts(args.eval_counts, "--eval-counts", n)

    model, train, validate = _embedded(args, check) if args.model is None else _hugging_face(args, check)
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "train.log")
    torch.manual_seed(args.seed)
    width = model.config.vision_config.hidden_size
    params = {k: v.to(model.device).requires_grad_(True) for k, v in init_tensors(width, args.hidden).items()}

    def step(rng):
        k = counts[rng.integers(len(counts))]
        logits, labels = train(params, k, rng)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return loss, {"loss": loss.item()}

    minutes = fit(args, params, step, log, f"training tokenflex: counts {counts}, args {vars(args)}")
    if minutes is None:
        return args.out
    val = {}
    for k in eval_counts:
        val[str(k)] = answer_scores(validate(params, k))
    log("val " + ", ".join(f"k={k}: loss {v['loss']:.3f} acc {v['token_accuracy']:.3f}" for k, v in val.items()))
    trained = {"args": {k: str(v) for k, v in vars(args).items()}, "counts": counts, "steps": args.steps,
               "minutes": round(minutes, 1), "validation": val, "torch": torch.__version__}
    learned.save(args.out, "tokenflex", learned.signature(model), {k: v.detach() for k, v in params.items()},
                 trained=trained)
    (args.out / "train_log.json").write_text(json.dumps(trained, indent=1) + "\n")
    log(f"wrote {args.out} after {minutes:.1f} min")
    return args.out


def _embedded(args, check):
    """(model, train(params, k, rng) -> (logits, labels), validate(params, k) -> batches) on the embedded
    model's tower features: the block, the frozen projector and LM only. ``check(patch tokens per image)``
    runs before the model loads."""
    from ..embedded import load_embedded
    from ..embedded.train import Batcher, load_split, scene_questions

    if not (args.data / "train_feats.npy").is_file():
        raise VlpruneError(f"--data {str(args.data)!r} holds no train_feats.npy; write the tower features with "
                           f"`python -m vlprune.embedded.features --out {args.data}`")
    feats, _, _, recs = load_split(args.data, "train")
    n = feats.shape[1]  # patch tokens per image, a square grid
    grid = (math.isqrt(n), math.isqrt(n))
    check(n)
    vfeats, _, _, vrecs = load_split(args.data, "val")
    vfeats, vrecs = torch.from_numpy(np.array(vfeats[:args.val])).float(), vrecs[:args.val]
    model, processor = load_embedded()
    model.requires_grad_(False)
    batcher = Batcher(processor.tokenizer)

    def train(params, k, rng):
        idx = np.sort(rng.choice(len(feats), args.batch, replace=False))
        qa = [scene_questions(recs[i]["objects"], rng, args.questions) for i in idx]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(model, batcher, torch.from_numpy(feats[idx]).float(), qa, k, params, grid)

    def validate(params, k):
        for start in range(0, len(vrecs), 50):
            qa = [vrecs[i]["qas"] for i in range(start, min(len(vrecs), start + 50))]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                yield forward(model, batcher, vfeats[start:start + len(qa)], qa, k, params, grid)

    return model, train, validate


def _hugging_face(args, check):
    """The same on ``--model`` (a Hugging Face LLaVA-style VLM, one square-grid image per prompt) and a JSONL
    of prompts (a tenth, at least one, held out): the block runs inside the patched model itself,
    ``vlprune.patch(model, "tokenflex", keep=k)`` with the trained tensors bound to it, tower and all."""
    import vlprune

    from . import draw_prompts, held_out_chunks, jsonl_prompts
    from .dyvte import answer_inputs, load_base

    data, held_out = jsonl_prompts(args)
    n = _grid_tokens(args.model)
    check(n)
    model, processor = load_base(args)
    model.requires_grad_(False)
    start = learned.save(args.out / "start", "tokenflex", learned.signature(model),
                         init_tensors(model.config.vision_config.hidden_size, args.hidden))  # what patch() checks
    got = int((answer_inputs(model, processor, data[:1])[0]["input_ids"] == model.config.image_token_id).sum())
    if got != n:
        raise VlpruneError(f"vlprune-train tokenflex --model needs one {n}-token square-grid image per prompt "
                           f"(LLaVA-1.5 style); the processor gave {got}")

    def forward_hf(params, k, chunk):
        inputs, _, targets = answer_inputs(model, processor, chunk)
        with vlprune.pruned(model, "tokenflex", weights=str(start), keep=k) as handle:
            handle.method.bind(params)
            logits = model(**inputs).logits  # the pruned sequence: each image n - k positions shorter
        rows, cols = targets.nonzero(as_tuple=True)
        labels = torch.full(logits.shape[:2], -100, device=logits.device)
        labels[rows, cols - 1 - (n - k)] = inputs["input_ids"][rows, cols]
        return logits, labels

    def train(params, k, rng):
        return forward_hf(params, k, draw_prompts(data, args, rng))

    def validate(params, k):
        for chunk in held_out_chunks(held_out, args):
            yield forward_hf(params, k, chunk)

    return model, train, validate


def _grid_tokens(name) -> int:
    """The visual tokens of one image of ``--model`` by its config (LLaVA-1.5 style: the patch grid, no [CLS])."""
    from transformers import AutoConfig

    vision = getattr(AutoConfig.from_pretrained(name), "vision_config", None)
    if vision is None or not hasattr(vision, "patch_size"):
        raise VlpruneError(f"vlprune-train tokenflex --model needs a LLaVA-style VLM with a vision_config; got {name!r}")
    return (vision.image_size // vision.patch_size) ** 2
