"""Train ATP-LLaVA's pruning modules on a frozen VLM (default: the embedded model's training features).

Each step runs the frozen model on one question per image with soft masks. Before each module's layer the
module reads the attention the image tokens received at the layer before (from that layer's q/k, as the
patched model does at inference), predicts its two thresholds, and from then on every later layer's
attention to an image token is weighted by how much of it is kept: the larger of the two sigmoids of
(score - threshold) x ``--temperature``, times what earlier modules kept (a token always sees itself).
The loss is the answers' cross-entropy plus ``--budget-weight`` x (mean share of image tokens per decoder
layer - ``--budget``)^2: the compute term. Resumable from ``--out`` (a checkpoint every ``--save-every``
steps); it writes ``config.json`` + ``model.safetensors`` (``vlprune.patch(model, "atp", weights=OUT)``),
``train.log`` and ``train_log.json`` (arguments, validation loss, answer-token accuracy and share, time).

The features are the frozen tower's, computed once: ``python -m vlprune.embedded.features --out DIR``.
With ``--model`` (a Hugging Face LLaVA-style VLM, one square-grid image per prompt) it trains on a JSONL of
{"image", "question", "answer"} instead (``eval/recipes/atp-llava15.md``), holding out a tenth to validate.
"""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import learned
from ..builtin_methods.atp import default_layers, init_tensors, modules, redundancy, spatial_scores, thresholds
from ..errors import VlpruneError
from . import Log, answer_scores, check_positive, data_arguments, fit, step_arguments


def add_arguments(ap) -> None:
    data_arguments(ap)
    ap.add_argument("--layers", default=None,
                    help="decoder layers the modules prune before, comma-separated (default: 4/32, 14/32 and "
                         "24/32 of the depth)")
    ap.add_argument("--budget", type=float, default=0.45,
                    help="target mean share of image tokens per decoder layer (layers before the first module "
                         "count as 1)")
    ap.add_argument("--budget-weight", type=float, default=20.0)
    ap.add_argument("--temperature", type=float, default=10.0, help="of the soft masks")
    ap.add_argument("--lam", type=float, default=3.0, help="spatial score: 1 - lam * sampling rate")
    ap.add_argument("--hidden", type=int, default=64, help="the threshold networks' hidden width")
    ap.add_argument("--val", type=int, default=200, help="validation scenes")
    step_arguments(ap, steps=400, batch=32, lr=3e-3, warmup=20, save_every=50, log_every=10,
                   batch_help="image-question pairs per step")


def attention(attn, x, position_embeddings, mask) -> torch.Tensor:
    """(B, H, L, L) softmax attention of decoder self-attention ``attn`` on its normed input ``x`` with an
    additive ``mask`` (B, 1, L, L)."""
    b, length, _ = x.shape
    q = attn.q_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)
    q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, *position_embeddings)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scaling + mask, dim=-1)


class SoftModules:
    """Pre-hooks on a frozen decoder's layers that run ATP's modules with soft masks (training only).
    ``begin`` arms one batch; ``shares`` then holds each layer's kept share of image tokens (B,)."""

    def __init__(self, layers, plan, params, lam, temperature):
        self.plan, self.params, self.lam, self.temperature = plan, params, lam, temperature
        self.depth = len(layers)
        self.handles = [layers[i].register_forward_pre_hook(functools.partial(self._before, i), with_kwargs=True)
                        for i in range(plan[0] - 1, len(layers))]

    def remove(self):
        for h in self.handles:
            h.remove()

    def begin(self, image_mask, text_mask, grid):
        """``image_mask`` (B, L): the image tokens (one image of ``grid`` per row); ``text_mask`` (B, L): the
        question's tokens after it, to the prompt's last."""
        n = int(image_mask[0].sum())
        self.cols = image_mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :n]  # (B, N)
        self.text, self.grid = text_mask, grid
        self.log_keep = torch.zeros(image_mask.shape[0], n, device=image_mask.device)  # log share kept, per token
        self.shares = [torch.ones(image_mask.shape[0], device=image_mask.device)] * (self.plan[0] - 1)
        self.seen = {}  # module layer -> (B, N) what a hard threshold would keep (inspection, tests)

    def _mask(self, mask, hidden):
        b, length = hidden.shape[:2]
        dev = hidden.device
        if mask is None:
            mask = torch.ones(length, length, dtype=torch.bool, device=dev).tril()[None, None]
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, device=dev).masked_fill(~mask, float("-inf"))
        cols = torch.zeros(b, length, device=dev).scatter(1, self.cols, self.log_keep)
        eye = torch.eye(length, dtype=torch.bool, device=dev)
        return mask.float() + cols[:, None, None, :].masked_fill(eye, 0.0)

    def _before(self, i, layer, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = self._mask(kwargs.get("attention_mask"), hidden)
        self.shares.append(self.log_keep.exp().mean(1))
        if i + 1 in self.plan:
            with torch.no_grad():
                att = attention(layer.self_attn, layer.input_layernorm(hidden), kwargs["position_embeddings"], mask)
            self._module(i + 1, att)
        return args, {**kwargs, "attention_mask": mask.to(hidden.dtype)}

    def _module(self, layer, att):
        keep = self.log_keep.detach().exp()
        alive = keep > 0.5  # what inference would still hold
        image = torch.zeros(att.shape[0], att.shape[-1], device=att.device).scatter(1, self.cols, keep)
        received = []
        for w in (image, self.text.float()):
            w = w / w.sum(1, keepdim=True).clamp(min=1e-6)
            got = torch.einsum("bq,bhqk->bhk", w, att.nan_to_num(0.0)).mean(1)  # head mean (B, L)
            received.append(got.gather(1, self.cols))
        score, features = redundancy(*received, alive)
        theta_r, theta_s = thresholds(features, self.params[layer])
        spatial = spatial_scores(self.grid, self.lam, att.device)
        t = self.temperature
        self.seen[layer] = ((score > theta_r) | (spatial > theta_s)).detach()
        self.log_keep = self.log_keep + torch.maximum(F.logsigmoid((score - theta_r) * t),
                                                      F.logsigmoid((spatial - theta_s) * t))

    def mean_share(self) -> torch.Tensor:
        """(B,) the mean over all decoder layers of the share of image tokens each saw."""
        return torch.stack(self.shares, 1).mean(1)


def forward(model, batcher, soft, feats, qa, grid):
    """(logits, labels, mean share (B,)) of the frozen model, modules soft, on one question per image."""
    from ..embedded.train import PREFIX

    m = model.model
    n = feats.shape[1]
    proj = m.multi_modal_projector(feats)
    ids, labels, mask, pos = batcher.build([[q] for q in qa], n)
    embeds = m.get_input_embeddings()(ids)
    embeds[:, PREFIX:PREFIX + n] = proj.to(embeds.dtype)
    where = torch.arange(ids.shape[1])
    image = (where >= PREFIX) & (where < PREFIX + n)
    last = (labels != -100).to(torch.int8).argmax(1, keepdim=True)  # the prompt's last token predicts the answer
    text = (where >= PREFIX + n) & (where <= last)
    soft.begin(image.expand_as(ids), text, grid)
    hidden = m.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
    return model.lm_head(hidden), labels, soft.mean_share()


def forward_hf(model, processor, soft, chunk):
    """(logits, labels, mean share (B,)) of a frozen Hugging Face VLM, modules soft, on image + question +
    answer rows (the answer's tokens are the labels, at the positions that predict them)."""
    from .dyvte import answer_inputs

    inputs, anchor, targets = answer_inputs(model, processor, chunk)
    ids = inputs["input_ids"]
    image = ids == model.config.image_token_id
    n = image.sum(1)
    side = math.isqrt(int(n[0]))  # host sync: the grid's side
    if not bool((n == n[0]).all()) or side * side != int(n[0]):
        raise VlpruneError(f"vlprune-train atp --model needs one square-grid image per prompt (LLaVA-1.5 style); "
                           f"got image token counts {n.tolist()}")
    pos = torch.arange(ids.shape[1], device=ids.device)
    text = (pos > torch.where(image, pos, -1).amax(1, keepdim=True)) & (pos <= anchor.unsqueeze(1))
    soft.begin(image, text & inputs["attention_mask"].bool(), (side, side))
    logits = model(**inputs).logits
    rows, cols = targets.nonzero(as_tuple=True)
    labels = torch.full_like(ids, -100)
    labels[rows, cols - 1] = ids[rows, cols]
    return logits, labels, soft.mean_share()


def draw(recs, idx, rng):
    from ..embedded.train import scene_questions

    return [scene_questions(recs[i]["objects"], rng, 1)[0] for i in idx]


def validate(batches) -> dict:
    """Answer-token loss, accuracy and mean share (soft masks, teacher-forced) over ``batches``, an iterable
    of (logits, labels, shares)."""
    shares = []

    def answers():
        for logits, labels, share in batches:
            shares.append(share)
            yield logits, labels

    out = answer_scores(answers())
    mean = sum(s.sum().item() for s in shares) / sum(len(s) for s in shares)
    return {**out, "mean_share": round(mean, 4)}


def _layers(text, depth) -> list[int]:
    if text is None:
        return default_layers(depth)
    try:
        layers = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        layers = []
    if not layers or sorted(set(layers)) != layers or not all(1 <= i < depth for i in layers):
        raise VlpruneError(f"--layers must be ascending decoder layers in 1..{depth - 1}, comma-separated; got {text!r}")
    return layers


def run(args) -> Path:
    check_positive(args, "steps", "batch", "hidden", "val", "save_every", "warmup", "examples")
    if not 0 < args.budget <= 1:
        raise VlpruneError(f"--budget must be in (0, 1] (a share of image tokens); got {args.budget}")
    model, train, val = _embedded(args) if args.model is None else _hugging_face(args)
    model.requires_grad_(False)
    layers = model.model.language_model.layers
    plan = _layers(args.layers, len(layers))
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "train.log")
    torch.manual_seed(args.seed)
    tensors = {k: v.to(model.device).requires_grad_(True) for k, v in init_tensors(plan, args.hidden).items()}
    soft = SoftModules(layers, plan, modules(tensors), args.lam, args.temperature)

    def step(rng):
        logits, labels, share = train(soft, rng)
        answer = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        budget = args.budget_weight * (share.mean() - args.budget) ** 2
        return answer + budget, {"answer loss": answer.item(), "share": share.mean().item()}

    try:
        minutes = fit(args, tensors, step, log, f"training atp: modules before layers {plan}, args {vars(args)}")
        if minutes is None:
            return args.out
        val = validate(val(soft))
    finally:
        soft.remove()
    log(f"validation (soft masks): loss {val['loss']:.3f} acc {val['token_accuracy']:.3f} share {val['mean_share']:.3f}")
    trained = {"args": {k: str(v) for k, v in vars(args).items()}, "layers": plan, "steps": args.steps,
               "minutes": round(minutes, 1), "validation": val, "torch": torch.__version__}
    learned.save(args.out, "atp", learned.signature(model), {k: v.detach() for k, v in tensors.items()},
                 lam=args.lam, temperature=args.temperature, trained=trained)
    (args.out / "train_log.json").write_text(json.dumps(trained, indent=1) + "\n")
    log(f"wrote {args.out} after {minutes:.1f} min")
    return args.out


def _embedded(args):
    """(model, train(soft, rng) -> one step's batch, val(soft) -> validation batches) on the embedded model's
    tower features."""
    from ..embedded import load_embedded
    from ..embedded.train import Batcher, load_split

    if not (args.data / "train_feats.npy").is_file():
        raise VlpruneError(f"--data {str(args.data)!r} holds no train_feats.npy; write the tower features with "
                           f"`python -m vlprune.embedded.features --out {args.data}`")
    feats, _, _, recs = load_split(args.data, "train")
    side = math.isqrt(feats.shape[1])
    vfeats, _, _, vrecs = load_split(args.data, "val")
    vfeats, vrecs = torch.from_numpy(np.array(vfeats[:args.val])).float(), vrecs[:args.val]
    model, processor = load_embedded()
    batcher = Batcher(processor.tokenizer)

    def train(soft, rng):
        idx = np.sort(rng.choice(len(feats), args.batch, replace=False))
        return forward(model, batcher, soft, torch.from_numpy(feats[idx]).float(), draw(recs, idx, rng), (side, side))

    def val(soft):
        rng = np.random.default_rng(args.seed)
        for a in range(0, len(vrecs), 50):
            idx = range(a, min(len(vrecs), a + 50))
            yield forward(model, batcher, soft, vfeats[a:a + len(idx)], draw(vrecs, idx, rng), (side, side))

    return model, train, val


def _hugging_face(args):
    """The same on ``--model`` and a JSONL of prompts (a tenth, at least one, held out)."""
    from . import draw_prompts, held_out_chunks, jsonl_prompts
    from .dyvte import load_base

    data, held_out = jsonl_prompts(args)
    model, processor = load_base(args)

    def train(soft, rng):
        return forward_hf(model, processor, soft, draw_prompts(data, args, rng))

    def val(soft):
        for chunk in held_out_chunks(held_out, args):
            yield forward_hf(model, processor, soft, chunk)

    return model, train, val
