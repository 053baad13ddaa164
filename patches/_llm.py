"""Pruning inside an HF decoder LM (stage "llm"): image tokens leave the sequence at decoder layer K.

Shared by the patchers whose LM is a Llama-style HF decoder (``layers[i].self_attn.{q,k}_proj``,
rotary ``position_embeddings`` passed to every layer). At prefill, hooks on layer K-1 compute one
attention row - the prompt's last token over all keys - from q/k (no N x N, SDPA stays on); a
pre-hook on layer K drops the image positions the method rejects, and pre-hooks on every later
layer shorten what the model's loop hands each layer (rotary tables, position ids, attention mask)
the same way. Survivors keep their original positions. Later layers fill their KV cache with the
short sequence; during decoding the same hooks cut the mask's columns to match, keyed by the cache
object, so ``generate`` with a cache, batches with left padding and uncached generation agree.

A family only says where each image is (:class:`LLMImage`: its visual tokens' places in the sequence,
the grid the method sees, its k, and how to record it); the choice is made here, once for every family,
in one batched ``select`` per group of images of the same size, grid and k.

Rows of a batch must keep equally many positions. With ``ragged=True`` they may differ: a shorter row
also keeps some of its dropped positions as fillers that no other position may attend to (their key
columns are masked at every later layer and decode step), so rows share one length.

A method with a plan (``llm_plan``: ATP-LLaVA) drops at several layers, each image as many tokens as the
method decides from the attention its tokens received at the layer before (``image_attention`` /
``text_attention``); every drop composes with the earlier ones, and each layer's KV cache keeps the
columns it saw. Plans always run ragged.
"""
from __future__ import annotations

import functools
import sys
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from vlprune.errors import VlpruneError
from vlprune.builtin_methods.base import Context, Method, Signal
from vlprune.builtin_methods.dyvte import text_state
from vlprune.patcher import ImageRecord
from vlprune.sequence import is_right_padded

CHUNK = 256  # query rows per step when a plan reads attention received (never L x L x heads at once)


def gather_seq(t: torch.Tensor, cols: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Gather positions ``cols`` (B, L') along ``dim`` of a batch-first tensor (batch dim may be 1)."""
    t = t.expand(cols.shape[0], *t.shape[1:])
    shape = [cols.shape[0]] + [1] * (t.dim() - 1)
    shape[dim] = cols.shape[1]
    index = cols.view(shape).expand(*[cols.shape[1] if i == dim else s for i, s in enumerate(t.shape)])
    return t.gather(dim, index)


def _bool_or_additive(mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask.float()


def _hide(mask, filler, q_len: int, kv: int):
    """``mask`` (B or 1, 1, q_len, kv; None: plain causal) with the filler key columns (``filler`` (B, <= kv),
    True = filler) hidden from every query but the filler itself."""
    dev = filler.device
    own_col = (torch.arange(q_len, device=dev) + kv - q_len).unsqueeze(1)  # each query's own key column
    cols = torch.arange(kv, device=dev)
    hide = F.pad(filler, (0, kv - filler.shape[1]))[:, None, None, :] & (cols != own_col)
    if mask is None:
        return (cols <= own_col) & ~hide
    mask = mask.expand(filler.shape[0], *mask.shape[1:])
    if mask.dtype == torch.bool:
        return mask & ~hide
    return mask.masked_fill(hide, torch.finfo(mask.dtype).min)


def _mark(keep, rows, cols, on):
    """``keep`` (B, L) with ``keep[rows, cols] |= on`` (same-shaped index tensors; no host sync, and an
    index pair repeated with ``on`` False leaves its entry as it was)."""
    flat = (rows * keep.shape[1] + cols).flatten()
    out = keep.to(torch.int8).flatten().scatter_reduce(0, flat, on.flatten().to(torch.int8), "amax")
    return out.view(keep.shape).bool()


@dataclass(frozen=True)
class LLMImage:
    """One image in the LM sequence, as its family lays it out."""

    row: int  # batch row
    places: torch.Tensor  # (N, 2): (row, column) of its N visual tokens in the sequence, in the method's order
    grid: tuple[int, int]  # the grid the method sees the N tokens as
    k: int  # tokens it keeps (0: all leave; >= N: all stay)
    record: Callable | None = None  # (kept, scores) -> its ImageRecord; default: a plain ImageRecord
    companions: Callable | None = None  # kept -> (M, 2) places that stay with them (NeXT: row newlines)

    def recorded(self, kept: torch.Tensor, scores: torch.Tensor | None = None) -> ImageRecord:
        if self.record is not None:
            return self.record(kept, scores)
        return ImageRecord(row=self.row, before=len(self.places), after=len(kept), kept=kept, scores=scores)

    def untouched(self) -> ImageRecord:
        """Its record while every token is still in (before the drop, or when nothing drops)."""
        return self.recorded(torch.arange(len(self.places), device=self.places.device))


class LLMPruning:
    """Drop image tokens at decoder layer K = ``method.llm_layer(depth)``.

    With a ``method.exit_threshold()``, K is only the earliest layer: the drop happens at the first layer
    >= K where the anchor token's attention mass on the image tokens at the previous layer is below the
    threshold in every row of the batch. A method whose ``exit_votes`` answer (a learned gate, ``dyvte``)
    decides the same way from the layer's input: at the first layer >= K where every row votes to exit.
    """

    def __init__(self, patcher, layers, method, ragged: bool = False):
        n = len(layers)
        plan = method.llm_plan(n)
        self.plan = None if plan is None else list(plan)
        self.ragged = ragged or plan is not None  # rows may keep different counts (masked fillers even them out)
        if plan is not None and (not plan or any(not isinstance(i, int) or not 1 <= i < n for i in plan)
                                 or sorted(set(plan)) != list(plan)):
            raise VlpruneError(f"method={method.name!r} plans drops before decoder layers {plan!r}, which do not fit "
                               f"a {n}-layer LM (allowed: ascending layers in 1..{n - 1}); weights trained for "
                               "another model?")
        k_layer = method.llm_layer(n)
        if not isinstance(k_layer, int) or not 1 <= k_layer < n:
            raise VlpruneError(f"layer={k_layer!r} is out of range for method={method.name!r} on a {n}-layer LM "
                               f"(allowed 1..{n - 1}: the decoder layer from which image tokens are dropped)")
        self.patcher, self.method, self.k_layer = patcher, method, k_layer
        self.threshold = method.exit_threshold()
        self.by_state = type(method).exit_votes is not Method.exit_votes
        self.fixed = self.threshold is None and not self.by_state
        self.pending = None
        self.sessions = weakref.WeakKeyDictionary()
        ledger = patcher.ledger
        self.rope = sys.modules[type(layers[0].self_attn).__module__].apply_rotary_pos_emb
        if self.plan is not None:
            watched = [i - 1 for i in self.plan]
        else:
            watched = [k_layer - 1] if self.fixed else range(k_layer - 1, n - 1)
        for idx in watched:  # layers whose anchor attention row decides at the next layer
            attn = layers[idx].self_attn
            ledger.hook(attn.register_forward_pre_hook(functools.partial(self._grab_kwargs, idx), with_kwargs=True))
            ledger.hook(attn.q_proj.register_forward_hook(functools.partial(self._keep_q, idx)))
            ledger.hook(attn.k_proj.register_forward_hook(functools.partial(self._on_k, idx, attn)))
        for idx in range(k_layer, n):
            hook = functools.partial(self._before_layer, idx)
            ledger.hook(layers[idx].register_forward_pre_hook(hook, with_kwargs=True))

    # -- per call ---------------------------------------------------------------------------------
    def begin(self, image_mask, images: list[LLMImage], anchor, valid=None):
        self.pending = {"image_mask": image_mask, "images": images, "anchor": anchor, "valid": valid, "cols": None,
                        "filler": None, "exit": None, "counts": [{} for _ in images]}

    def end(self):
        self.pending = None

    def run(self, original, kw, image_mask, images: list[LLMImage], prompt_len=None):
        """The LM call ``original(**kw)`` with the drop armed. The query row is each sequence's last prompt
        token: inside generate() without a cache the sequence grows, but the prompt (and so the choice)
        stays the same. ``labels`` are taken out and the loss recomputed over the positions that reached
        the head (fillers count for none)."""
        mask = kw.get("attention_mask")
        length = image_mask.shape[1] if prompt_len is None else prompt_len
        anchor = torch.full((image_mask.shape[0],), length - 1, device=image_mask.device)
        if mask is not None and mask.dim() == 2:  # right-padded rows end earlier
            anchor = torch.where(is_right_padded(mask), mask[:, :length].long().sum(1) - 1, anchor)
        labels = kw.pop("labels", None)
        valid = mask[:, : image_mask.shape[1]].bool() if mask is not None and mask.dim() == 2 else None
        self.begin(image_mask, images, anchor, valid)
        try:
            out = original(**kw)
            cols, filler = self.pending["cols"], self.pending.get("filler")
        finally:
            self.end()
        if labels is not None:
            if cols is not None:
                labels = labels.gather(1, cols)
                if filler is not None:
                    labels = labels.masked_fill(filler, -100)
            model = self.patcher.model
            out.loss = model.loss_function(logits=out.logits, labels=labels,
                                           vocab_size=model.config.text_config.vocab_size)
        return out

    def _watching(self, idx) -> bool:
        if self.pending is None:
            return False
        return idx + 1 in self.plan if self.plan is not None else self.pending["cols"] is None

    # -- layer before the exit: the anchor token's attention row ----------------------------------
    def _grab_kwargs(self, idx, _module, _args, kwargs):
        if self._watching(idx):
            self.pending["rope"] = kwargs.get("position_embeddings")
            self.pending["mask"] = kwargs.get("attention_mask")

    def _keep_q(self, idx, _module, _inputs, output):
        if self._watching(idx):
            self.pending["q"] = output

    def _on_k(self, idx, attn, _module, _inputs, output):
        p = self.pending
        if not self._watching(idx) or "q" not in p:
            return
        b, length, _ = output.shape
        q = p.pop("q").view(b, length, -1, attn.head_dim).transpose(1, 2)
        k = output.view(b, length, -1, attn.head_dim).transpose(1, 2)
        cos, sin = p.pop("rope")
        q, k = self.rope(q, k, cos, sin)
        if self.plan is not None:
            p["received"] = self._received(q, k, p.pop("mask"), attn.scaling)
            return
        rows = torch.arange(b, device=q.device)
        q_last = q[rows, :, p["anchor"]].unsqueeze(2).float()  # (B, H, 1, d)
        k = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q_last @ k.transpose(-1, -2)).squeeze(2) * attn.scaling  # (B, H, L)
        mask = p.pop("mask")
        if mask is not None and not isinstance(mask, dict):
            row = mask.expand(b, *mask.shape[1:])[rows, :, p["anchor"]]  # (B, 1 or H, KV)
            logits = _bool_or_additive(row[..., -length:], logits)
        p["attention"] = torch.softmax(logits, dim=-1)

    def _received(self, q, k, mask, scaling):
        """(image, text): (images, H, L) the attention each key receives, averaged over the image's own
        tokens still in and over the prompt's text after it (to its last token), from roped q/k (B, H, L, d)."""
        b, heads, length, _ = q.shape
        own, text, rows = self._query_weights(length)
        k = k.float().repeat_interleave(heads // k.shape[1], dim=1)
        image_in = torch.zeros(len(rows), heads, length, device=q.device)
        text_in = torch.zeros_like(image_in)
        if isinstance(mask, dict):
            mask = None
        for a in range(0, length, CHUNK):
            logits = (q[:, :, a:a + CHUNK].float() @ k.transpose(-1, -2)) * scaling  # (B, H, c, L)
            if mask is None:
                own_col = torch.arange(a, a + logits.shape[2], device=q.device).unsqueeze(1)
                logits = logits.masked_fill(torch.arange(length, device=q.device) > own_col, float("-inf"))
            else:
                logits = _bool_or_additive(mask.expand(b, *mask.shape[1:])[..., a:a + CHUNK, -length:], logits)
            att = torch.softmax(logits, dim=-1).nan_to_num(0.0)[rows]  # fully masked padding rows: no weight
            image_in += torch.einsum("iq,ihqk->ihk", own[:, a:a + CHUNK], att)
            text_in += torch.einsum("iq,ihqk->ihk", text[:, a:a + CHUNK], att)
        return image_in, text_in

    def _query_weights(self, length):
        """(own, text) (images, L) query weights over the current sequence, each row summing to 1 (or 0),
        and each image's batch row."""
        p = self.pending
        mask, images = p["image_mask"], p["images"]
        dev, full = mask.device, mask.shape[1]
        orig = p["cols"] if p["cols"] is not None else torch.arange(full, device=dev).expand(mask.shape[0], -1)
        real = torch.ones_like(orig, dtype=torch.bool) if p["filler"] is None else ~p["filler"]
        rows = torch.tensor([im.row for im in images], device=dev)
        pos = torch.arange(full, device=dev)
        member = torch.zeros(len(images), full, dtype=torch.bool, device=dev)
        for i, im in enumerate(images):
            member[i, im.places[:, 1]] = True
        last = torch.where(member, pos, -1).amax(1, keepdim=True)
        text = (pos > last) & (pos <= p["anchor"][rows].unsqueeze(1)) & ~mask[rows]
        if p["valid"] is not None:
            text &= p["valid"][rows]
        weights = []
        for w in (member, text):
            w = (w.gather(1, orig[rows]) & real[rows]).float()
            weights.append(w / w.sum(1, keepdim=True).clamp(min=1))
        return weights[0], weights[1], rows

    # -- layers >= K: drop, then keep every layer's inputs consistent ------------------------------
    def _select(self, hidden, idx):
        """Positions (B, L') of the current sequence that go on; updates the call's columns (original
        positions), fillers and records."""
        p = self.pending
        if self.plan is not None:
            keep, records = self._choose_plan(hidden, idx)
        elif "attention" not in p:
            raise RuntimeError("the attention row of the anchor token was not captured at layer K-1")
        else:
            keep, records = self._choose(hidden, p.pop("attention"))
        counts = keep.sum(1)
        sizes = counts.tolist()  # host sync: the survivors' count is the shape of every later layer
        width = max(sizes)
        filler = None
        if min(sizes) != width:
            if not self.ragged:
                raise VlpruneError(
                    f"method={self.method.name!r} prunes inside the LM and needs the same number of images in "
                    "every prompt of a batch (rows would otherwise need different lengths mid-network); "
                    "batch prompts by image count"
                )
            dropped = ~keep  # a shorter row keeps its first dropped positions, masked, as fillers
            filler = dropped & (dropped.long().cumsum(1) <= (width - counts).unsqueeze(1))
            keep = keep | filler
        local = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]  # kept, in order
        p["cols"] = local if p["cols"] is None else p["cols"].gather(1, local)
        p["filler"] = None if filler is None else filler.gather(1, local)
        for record in records:
            record.layer = idx
        self.patcher.handle.last = records
        return local

    def _choose_plan(self, hidden, idx):
        """A plan's drop before layer ``idx``: (keep mask (B, L') over the current sequence, image records).
        Images of one size and grid decide in one batched ``llm_keep``."""
        p = self.pending
        image_in, text_in = p.pop("received")
        images, mask = p["images"], p["image_mask"]
        b, length = hidden.shape[:2]
        current = torch.full_like(mask, -1, dtype=torch.long)  # original position -> current one (-1: gone)
        orig = p["cols"] if p["cols"] is not None else torch.arange(length, device=mask.device).expand(b, -1)
        real = torch.ones_like(orig, dtype=torch.bool) if p["filler"] is None else ~p["filler"]
        current.scatter_(1, orig, torch.where(real, torch.arange(length, device=mask.device), -1).expand(b, -1))
        keep = ~mask.gather(1, orig) & real
        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault((len(image.places), image.grid), []).append(i)
        records = [None] * len(images)
        for (n, grid), members in groups.items():
            places = torch.stack([images[i].places for i in members])  # (I, N, 2)
            rows = places[..., 0]
            cols = current[rows, places[..., 1]]  # (I, N)
            alive = cols >= 0
            at = cols.clamp(min=0)
            heads = image_in.shape[1]
            signals = {Signal(kind, idx - 1): t[members].gather(2, at.unsqueeze(1).expand(-1, heads, -1))
                       * alive.unsqueeze(1) for kind, t in (("image_attention", image_in), ("text_attention", text_in))}
            tokens = hidden[rows, at] * alive.unsqueeze(-1)
            kept, scores = self.method.llm_keep(idx, tokens, Context(grid=grid, signals=signals, alive=alive))
            kept = kept & alive
            keep = _mark(keep, rows, at, kept)
            for j, i in enumerate(members):
                # host sync: each image keeps the count the method chose; its record lists those indices
                indices = kept[j].nonzero().squeeze(1)
                if images[i].companions is not None:
                    extra = current[images[i].companions(indices).unbind(1)]
                    keep = _mark(keep, torch.full_like(extra, images[i].row), extra.clamp(min=0), extra >= 0)
                p["counts"][i][idx] = len(indices)
                records[i] = images[i].recorded(indices, None if scores is None else scores[j])
                records[i].counts = dict(p["counts"][i])
        return keep, records

    def _choose(self, hidden, attention):
        """The method's choice: (keep mask (B, L) of text and surviving image positions, image records).
        Images of one size, grid and k are chosen in one batched ``select``."""
        p = self.pending
        images, keep = p["images"], ~p["image_mask"]
        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault((len(image.places), image.grid, image.k), []).append(i)
        records = [None] * len(images)
        for (n, grid, k), members in groups.items():
            places = torch.stack([images[i].places for i in members])  # (I, N, 2)
            kept, scores = self._select_places(hidden, attention, places, grid, k)
            chosen = places.gather(1, kept.unsqueeze(-1).expand(-1, -1, 2))
            keep[chosen[..., 0], chosen[..., 1]] = True
            for j, i in enumerate(members):
                if images[i].companions is not None:
                    extra = images[i].companions(kept[j])
                    keep[extra[:, 0], extra[:, 1]] = True
                records[i] = images[i].recorded(kept[j], None if scores is None else scores[j])
        return keep, records

    def _select_places(self, hidden, attention, places, grid, k):
        """(kept indices (I, k') ascending, scores or None) of I images whose tokens sit at ``places``."""
        n = places.shape[1]
        if k == 0 or k >= n:
            every = torch.arange(n if k else 0, device=hidden.device)
            return every.expand(places.shape[0], -1), None
        rows, cols = places[..., 0], places[..., 1]
        signal = {Signal("last_attention", self.k_layer - 1): attention[rows, :, cols].transpose(1, 2)}  # (I, H, N)
        sel = self.method.select(hidden[rows, cols], k, Context(grid=grid, signals=signal))
        return sel.indices.sort(dim=1).values, sel.scores

    def _exit_now(self, idx, hidden) -> bool:
        """Fixed layer: always. Threshold: the image's share of the anchor's attention fell below it. Votes:
        the method's gate on this layer's input says so. A batch exits when every row does."""
        if self.fixed:
            return True
        p = self.pending
        if self.by_state:
            votes = self.method.exit_votes(idx, *self._text_state(hidden))
        else:
            image = p["image_mask"].unsqueeze(1).float()  # (B, 1, L)
            votes = (p["attention"] * image).sum(-1).mean(1) < self.threshold  # head mean, per row
        return bool(votes.all())  # host sync: the exit decides the length of every later layer's sequence

    def _text_state(self, hidden):
        """(mean over the prompt's text tokens after its last image token, before the last; the last token),
        both (B, D) float32, from a layer's input ``hidden`` (B, L, D)."""
        p = self.pending
        return text_state(hidden, p["image_mask"], p["anchor"], p["valid"])

    def _drops_at(self, idx, hidden) -> bool:
        p = self.pending
        if self.plan is not None:
            return idx in self.plan
        if p["cols"] is not None:
            return False
        if self._exit_now(idx, hidden):
            return True
        p.pop("attention", None)  # the next layer's row decides next
        return False

    def _drop(self, idx, hidden, cache):
        """The drop before layer ``idx``: the shortened ``hidden``; the cache remembers the columns kept."""
        p = self.pending
        length = p["image_mask"].shape[1]
        hidden = gather_seq(hidden, self._select(hidden, idx))
        if p["exit"] is None:
            p["exit"] = idx
            # keys cached before this call (a continued conversation) stay; layer 0 already holds ours
            p["past"] = cache.get_seq_length() - length if cache is not None else 0
            if cache is not None:
                self.sessions[cache] = {"length": p["past"] + length, "stages": []}
        p["filler_kv"] = None if p["filler"] is None else F.pad(p["filler"], (p["past"], 0))
        if cache is not None:
            cols = p["cols"]
            past = torch.arange(p["past"], device=cols.device).expand(cols.shape[0], -1)
            self.sessions[cache]["stages"].append((idx, torch.cat([past, cols + p["past"]], 1), p["filler_kv"]))
        return hidden

    def _before_layer(self, idx, _module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("cache")
        p = self.pending
        if p is not None:  # prefill of a pruned call
            if self._drops_at(idx, hidden):
                hidden = self._drop(idx, hidden, cache)
            elif p["cols"] is None:
                return None
            cols = p["cols"]
            q_cols = cols
            filler = p["filler_kv"]
        else:
            session = self.sessions.get(cache) if cache is not None else None
            stages = [] if session is None else [s for s in session["stages"] if s[0] <= idx]
            if not stages:  # layers before the first drop kept every token
                return None
            _, cols, filler = stages[-1]
            length = session["length"]
            q_cols = None
        new = dict(kwargs)
        if q_cols is not None:
            if kwargs.get("position_embeddings") is not None:
                new["position_embeddings"] = tuple(gather_seq(t, q_cols) for t in kwargs["position_embeddings"])
            if kwargs.get("position_ids") is not None and kwargs["position_ids"].dim() == 2:
                new["position_ids"] = gather_seq(kwargs["position_ids"], q_cols)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            kv = mask.shape[-1]
            if q_cols is not None:  # prefill: rows and columns of this call's tokens
                mask = gather_seq(mask, q_cols, dim=2)
                past = torch.arange(p["past"], device=cols.device).expand(cols.shape[0], -1)
                kv_cols = torch.cat([past, cols + p["past"]], dim=1)
            else:  # decoding: the kept prompt columns, then everything after the prompt
                kv_cols = torch.cat([cols, torch.arange(length, kv, device=cols.device).expand(cols.shape[0], -1)], 1)
            new["attention_mask"] = gather_seq(mask, kv_cols, dim=3)
        mask = new.get("attention_mask")
        if filler is not None and (mask is None or isinstance(mask, torch.Tensor) and mask.dim() == 4):
            q_len = hidden.shape[1]
            if mask is not None:
                kv = mask.shape[-1]
            elif p is not None:  # prefill: earlier calls' keys, then this call's kept positions
                kv = filler.shape[1]
            else:  # decoding: what this layer has cached, then this step
                kv = cache.get_seq_length(idx) + q_len
            new["attention_mask"] = _hide(mask, filler, q_len, kv)
        if args:
            return (hidden, *args[1:]), new
        new["hidden_states"] = hidden
        return args, new
