"""Train DyVTE's exit gates on a frozen VLM (default: the embedded model and its training scenes; any
Hugging Face VLM with ``--model`` and prompts from ``--data FILE.jsonl``).

As in the released code, the base model is frozen and only the gates learn; the label of (prompt, layer)
says whether dropping every image token before that layer leaves the answer as it was: the exited run's
greedy tokens agree with the full run's on every answer token (teacher-forced on the reference answer)
and its loss is below 1.03 x the full run's. The released code has no compute term beyond that label:
the gate exits wherever exiting is harmless. Two phases, both resumable from ``--out``:

1. labels: per chunk of prompts, one full forward (its hidden states are the gates' inputs) and one
   forward per candidate layer under ``visual_exit`` - the same code path the trained gate will drive;
   each chunk is saved as it completes;
2. gates: one per layer, cross-entropy on those labels; a checkpoint after every epoch.

It writes ``config.json`` + ``model.safetensors`` (``vlprune.patch(model, "dyvte", weights=OUT)``),
``train.log`` and ``train_log.json`` (arguments, label rates and gate accuracy per layer, time).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import learned
from ..builtin_methods.dyvte import gate_tensors, text_state
from . import Log, eta

LOSS_RATIO = 1.03  # the released label's loss margin (``--loss-ratio``)


def examples(start: int, n: int, per_scene: int, seed: int) -> list[dict]:
    """``n`` prompts from training scenes ``start..``: up to ``per_scene`` random questions of each."""
    from ..embedded import scenes

    rng = np.random.default_rng(seed)
    out, i = [], start
    while len(out) < n:
        scene = scenes.train_scene(i)
        image = scene.pil()
        for j in rng.permutation(len(scene.qas))[:per_scene]:
            qa = scene.qas[j]
            out.append({"image": image, "question": qa.question, "answer": qa.answer})
        i += 1
    return out[:n]


def prompt_text(processor, question: str) -> str:
    """One image and ``question`` in the model's own chat wording (the embedded model's template gives
    ``scenes.prompt``; LLaVA-1.5's the same USER/ASSISTANT turn)."""
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(turn, add_generation_prompt=True)


def answer_inputs(model, processor, chunk) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(model inputs on its device, each prompt's last token (B,), the answer positions (B, L) bool) of one
    image + question + answer + end-of-sequence per row, left padded so every answer ends at the right."""
    tok, dev = processor.tokenizer, model.device
    images, prompts = [e["image"] for e in chunk], [prompt_text(processor, e["question"]) for e in chunk]
    inputs = processor(images=images, text=[f"{p} {e['answer']}" for p, e in zip(prompts, chunk)],
                       return_tensors="pt", padding=True)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    # the prompts' lengths without preprocessing the images again: their text tokens, each image placeholder
    # expanded to the image's tokens as the processor did for the full sequences
    expanded = (ids == model.config.image_token_id).sum(1) - 1
    prompt_lengths = tok(prompts, padding=True, return_tensors="pt")["attention_mask"].sum(1) + expanded
    b, length = ids.shape
    n_answer = mask.sum(1) - prompt_lengths + 1  # the answer's tokens and the end-of-sequence appended next
    eos = torch.full((b, 1), tok.eos_token_id)  # the answer ends with end-of-sequence, as the model was taught
    inputs["input_ids"], inputs["attention_mask"] = torch.cat([ids, eos], 1), torch.cat([mask, torch.ones_like(eos)], 1)
    inputs = {k: v.to(dev, model.dtype) if v.is_floating_point() else v.to(dev) for k, v in inputs.items()}
    anchor = length - n_answer.to(dev)  # the prompt's last token (length + 1 positions now)
    targets = torch.arange(length + 1, device=dev).unsqueeze(0) > anchor.unsqueeze(1)  # answer and end-of-sequence
    return inputs, anchor, targets


@torch.inference_mode()
def label_chunk(model, processor, chunk, layers, loss_ratio: float = LOSS_RATIO) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (B, len(layers), 2D) float32, labels (B, len(layers)) bool) for one chunk of prompts."""
    import vlprune

    dev = model.device
    inputs, anchor, targets = answer_inputs(model, processor, chunk)
    ids = inputs["input_ids"]
    b = ids.shape[0]
    image = ids == model.config.image_token_id
    n_image = int(image.sum(1)[0])  # every prompt has one image: the exited sequence is this much shorter

    full = model(**inputs, output_hidden_states=True)
    valid = inputs["attention_mask"].bool()
    feats = []
    for layer in layers:  # the input of decoder layer `layer` (hidden_states[0] is the embeddings)
        feats.append(torch.cat(text_state(full.hidden_states[layer], image, anchor, valid), -1).cpu())

    def scored(logits, shift):
        """Per row: greedy tokens at the answer positions and the mean loss there (logits read ``shift``
        positions earlier than the full sequence's: the exited run has no image positions)."""
        rows, cols = targets.nonzero(as_tuple=True)
        step = logits[rows, cols - 1 - shift].float()
        loss = F.cross_entropy(step, ids[rows, cols], reduction="none")
        per_row = torch.zeros(b, device=dev).index_add_(0, rows, loss) / targets.sum(1)
        return step.argmax(-1), rows, per_row

    ref_tokens, rows, ref_loss = scored(full.logits, 0)
    labels = []
    for layer in layers:
        with vlprune.pruned(model, "visual_exit", layer=layer):
            out = model(**inputs)
        tokens, _, loss = scored(out.logits, n_image)
        agree = torch.zeros(b, device=dev).index_add_(0, rows, (tokens != ref_tokens).float()) == 0
        labels.append((agree & (loss < loss_ratio * ref_loss)).cpu())
    return torch.stack(feats, 1), torch.stack(labels, 1)


def make_labels(model, processor, data, args, layers, log) -> tuple[torch.Tensor, torch.Tensor]:
    parts = args.out / "labels"
    parts.mkdir(parents=True, exist_ok=True)
    chunks = range(0, len(data), args.chunk)
    t0, fresh = time.time(), 0
    feats, labels = [], []
    for c, start in enumerate(chunks):
        path = parts / f"part-{c:05d}.pt"
        if path.is_file():  # a resumed run: this chunk was labelled before
            part = torch.load(path)
        else:
            f, y = label_chunk(model, processor, data[start:start + args.chunk], layers, args.loss_ratio)
            part = {"feats": f, "labels": y}
            torch.save(part, path)
            fresh += 1
            if fresh % args.log_every == 0 or c == len(chunks) - 1:
                log(f"labels: chunk {c + 1}/{len(chunks)}, exit-safe rate so far "
                    f"{[round(r, 3) for r in torch.cat(labels + [y]).float().mean(0).tolist()]} (ETA {eta(fresh, len(chunks) - c - 1 + fresh, t0)})")
        feats.append(part["feats"])
        labels.append(part["labels"])
    return torch.cat(feats), torch.cat(labels)


def train_gates(feats, labels, layers, args, log) -> tuple[dict, dict]:
    """Gates (one per layer) trained by cross-entropy on ``labels``; a held-out tenth measures them."""
    gen = torch.Generator().manual_seed(args.seed)
    n = len(feats)
    order = torch.randperm(n, generator=gen)
    n_val = max(1, n // 10) if n > 1 else 0  # a held-out tenth (at least one prompt)
    val, tr = order[:n_val], order[n_val:]
    width = feats.shape[-1] // 2
    params = {k: v.requires_grad_() for k, v in gate_tensors(width, args.hidden or width // 2, layers, gen).items()}
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=0.0)
    ckpt = args.out / "gates.pt"
    epoch = 0
    if ckpt.is_file():
        state = torch.load(ckpt)
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(state["params"][k])
        opt.load_state_dict(state["opt"])
        epoch = state["epoch"]
        log(f"gates: resumed after epoch {epoch}")

    def logits(x, j, layer):
        return F.linear(F.gelu(F.linear(x[:, j], params[f"gates.{layer}.w1"])), params[f"gates.{layer}.w2"])

    t0 = time.time()
    for epoch in range(epoch, args.epochs):
        perm = tr[torch.randperm(len(tr), generator=gen)]
        for s in range(0, len(perm), args.batch):
            idx = perm[s:s + args.batch]
            loss = sum(F.cross_entropy(logits(feats[idx], j, layer), labels[idx, j].long()) for j, layer in enumerate(layers))
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save({"params": {k: v.detach() for k, v in params.items()}, "opt": opt.state_dict(), "epoch": epoch + 1}, ckpt)
        if (epoch + 1) % max(1, args.epochs // 10) == 0 or epoch + 1 == args.epochs:
            with torch.no_grad():
                acc = [(logits(feats[val], j, layer).argmax(-1) == labels[val, j].long()).float().mean().item()
                       for j, layer in enumerate(layers)]
            log(f"gates: epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f} held-out accuracy per layer "
                f"{[round(a, 3) for a in acc]} (ETA {eta(epoch + 1, args.epochs, t0)})")
    with torch.no_grad():
        stats = {}
        for j, layer in enumerate(layers):
            pred = logits(feats[val], j, layer).argmax(-1).bool()
            truth = labels[val, j]
            stats[str(layer)] = {"exit_safe_rate": round(labels[:, j].float().mean().item(), 4),
                                 "val_accuracy": round((pred == truth).float().mean().item(), 4),
                                 "val_predicted_exit_rate": round(pred.float().mean().item(), 4),
                                 "val_unsafe_exits": round((pred & ~truth).float().mean().item(), 4)}
    return {k: v.detach() for k, v in params.items()}, stats


def read_jsonl(path: Path, n: int) -> list[dict]:
    """The first ``n`` prompts of a JSONL file of {"image": path (relative to the file), "question", "answer"}."""
    from PIL import Image

    from ..errors import VlpruneError

    if not path.is_file():
        raise VlpruneError(f"--data {str(path)!r} is not a file (JSONL: one {{\"image\", \"question\", \"answer\"}} per line)")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if len(out) == n:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image = Image.open(path.parent / row["image"]).convert("RGB")
            out.append({"image": image, "question": str(row["question"]), "answer": str(row["answer"])})
        except (json.JSONDecodeError, KeyError, TypeError, OSError) as e:
            raise VlpruneError(f"--data {str(path)!r} line {i}: needs a JSON object with an openable 'image' "
                               f"path and 'question' and 'answer' strings ({type(e).__name__}: {e})") from None
    return out


def load_base(args):
    """(model, processor): the embedded model, or ``--model`` (a Hugging Face VLM id or folder) on ``--device``."""
    if args.model is None:
        from ..embedded import load_embedded

        return load_embedded()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    processor = AutoProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "left"  # every prompt ends where its answer starts, at the right
    return model.to(args.device).eval(), processor


def add_arguments(ap):
    ap.add_argument("--model", default=None,
                    help="a Hugging Face VLM (hub id or folder; needs --data) - default: the embedded model")
    ap.add_argument("--data", type=Path, default=None,
                    help="JSONL of {\"image\": path, \"question\", \"answer\"} (default: the embedded model's scenes)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--examples", type=int, default=3000, help="prompts to label")
    ap.add_argument("--per-scene", type=int, default=4, help="questions asked of each training scene")
    ap.add_argument("--start", type=int, default=20000,
                    help="first training-stream scene (the embedded model was trained on the first 12,000)")
    ap.add_argument("--chunk", type=int, default=32, help="prompts per labelling forward")
    ap.add_argument("--loss-ratio", type=float, default=LOSS_RATIO,
                    help="an exit is harmless only if its answer loss stays below this times the full run's")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hidden", type=int, default=0, help="gate width (0: half the LM width, as released)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10, help="log every this many labelled chunks")


def run(args) -> Path:
    from ..errors import VlpruneError

    if args.model is not None and args.data is None:
        raise VlpruneError("--model other than the embedded one needs --data FILE.jsonl (the synthetic scenes are "
                           "the embedded model's task)")
    t0 = time.time()
    data = read_jsonl(args.data, args.examples) if args.data else examples(args.start, args.examples, args.per_scene, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "train.log")
    log(f"dyvte: args {vars(args)}")
    model, processor = load_base(args)
    depth = model.config.text_config.num_hidden_layers
    layers = list(range(1, depth))  # a gate before every layer but the first: tokens may leave before it
    feats, labels = make_labels(model, processor, data, args, layers, log)
    label_minutes = (time.time() - t0) / 60
    log(f"labels: {len(labels)} prompts in {label_minutes:.1f} min; exit-safe rate per layer {[round(r, 3) for r in labels.float().mean(0).tolist()]}")
    params, stats = train_gates(feats, labels, layers, args, log)
    info = {"trained": {"args": {k: str(v) for k, v in vars(args).items()}, "layers": stats,
                        "prompts": len(labels), "minutes": round((time.time() - t0) / 60, 1),
                        "torch": torch.__version__}}
    learned.save(args.out, "dyvte", learned.signature(model), params, **info)
    (args.out / "train_log.json").write_text(json.dumps(info["trained"], indent=1) + "\n")
    log(f"wrote {args.out} after {info['trained']['minutes']} min: {stats}")
    return args.out
