"""Contrastive decoding inside ``generate()`` (``damro``): full rows and outlier-only rows, one LM call per step.

Family-agnostic (only :class:`ContrastTaps` assumes a CLIP-style tower, ``patches/_clip.py``). A
patcher that serves a decoding method builds, in its generate wrapper, the second prompt the method
contrasts with (an :class:`OutlierPrompt`: ids, mask, positions and the encoded
images of the outlier-only input, from the caller's prompt) and runs ``generate`` through
:meth:`ContrastSession.around`; its forward wrapper hands every forward call made meanwhile to
:meth:`ContrastSession.forward`, which returns the contrasted next-token logits as the model's own.
generate() keeps seeing B rows and one cache, so sampling, logits processors, stopping criteria,
streamers and ``max_length`` work as usual.

Prefill: the full prompt runs as generate asked (its cache C gets the B full rows); the outlier
prompt, shorter (the same text, a few image tokens), runs once beside it into a cache of its own,
which is then appended to C along the batch dimension, left-padded with masked zeros to C's length.
Decoding: every step is *one* LM call on the 2B rows [full; outlier] - the new token twice, the full
rows' mask and positions as generate passes them, the outlier rows' own (their padded prompt mask,
then the generated columns; positions continuing their prompt's). Why this shape: a second model call
per step would read every weight a second time per token, which is what decoding at small batch costs;
the batched step only adds the extra rows' attention over their (mostly padded) cache. Prefill runs
the two prompts apart, so the short one is not padded to the full length (which would double the
prefill's cost). Without a cache (``use_cache=False``) every step reruns both prompts, two calls.
When generate returns, C is cut back to its B full rows: a cache it returns is the plain one.

Needs the default dynamic KV cache (``DynamicCache`` of ``DynamicLayer``); others are rejected with a
clear error. One sequence per prompt: ``num_beams`` and ``num_return_sequences`` must be 1.

What a family provides: the prompt as ids (HF LLaVA, NeXT: the outlier rows are the caller's ids with
each image's placeholders cut to its outliers) or as embeddings (the original LLaVA code splices
images into ``inputs_embeds`` inside its own ``generate``, so its outlier rows are spliced the same
way; see ``OutlierPrompt.inputs_embeds``), the name its ``forward`` gives the cache (``cache_key``),
and the [CLS] rows (:class:`ContrastTaps`) from which :func:`choose_outliers` picks each image's
outliers among the tokens the LM sees.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlprune.errors import VlpruneError

from ._clip import ClipTaps

#: forward arguments that belong to one prompt and are replaced for the outlier rows (``past_key_values``
#: and ``images``: the original LLaVA code's names for the cache and the pixels)
PROMPT_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache", "past_key_values",
               "pixel_values", "images", "image_sizes", "mm_encoder_outputs", "labels")


class ContrastTaps:
    """The decoder's own [CLS] taps on a CLIP-style tower (``patches/_clip.py``), live only inside
    :meth:`capture`: a pruning method's taps may read another layer, or none at all (no ``prune=``)."""

    def __init__(self, layers, decoder, ledger):
        self.signal = decoder.signals()[0]
        self._live = False
        self.taps = ClipTaps(layers, [self.signal], ledger, lambda: self._live)

    def capture(self, encode):
        """Run ``encode()`` (a tower pass) with the taps live: (its result, the [CLS] rows (views, N) as the
        decoder's ``scoring`` reads them, averaged over the signal's heads)."""
        self._live = True
        try:
            out = encode()
        finally:
            self._live = False
            signals = self.taps.take()
        return out, signals[self.signal].mean(dim=1)


def choose_outliers(decoder, records, scores) -> list[torch.Tensor]:
    """Each image's outliers, picked by ``decoder.choose`` from its [CLS] scores (N,) among the tokens the
    LM sees (``kept`` of its record when the call was pruned, else all N) and recorded as ``outliers``.
    ``records`` and ``scores`` go image by image, in the same order."""
    chosen = []
    for rec, row in zip(records, scores):
        rec.outliers = decoder.choose(row, rec.kept.to(row.device) if rec.after < rec.before else None)
        chosen.append(rec.outliers)
    return chosen


@dataclass
class OutlierPrompt:
    """The outlier-only prompt of a batch: (B, L2) ids - or, for a family that splices its images into
    embeddings itself, ``inputs_embeds`` (B, L2, D) with ``input_ids`` None - mask and position ids, plus
    the forward arguments that carry its images (``extra``, e.g. ``{"mm_encoder_outputs": ...}``),
    passed at prefill only."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    inputs_embeds: torch.Tensor | None = None

    def __post_init__(self):
        if (self.input_ids is None) == (self.inputs_embeds is None):
            raise ValueError("an OutlierPrompt holds exactly one of input_ids and inputs_embeds")
        if self.attention_mask is None:
            rows = self.input_ids if self.input_ids is not None else self.inputs_embeds[..., 0]
            self.attention_mask = torch.ones(rows.shape, dtype=torch.long, device=rows.device)
        if self.position_ids is None:  # as generate derives them: count the real tokens
            mask = self.attention_mask.long()
            self.position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        self.next_position = self.position_ids.max(dim=1, keepdim=True).values + 1  # the first generated token's


class ContrastSession:
    """One ``generate()`` call under a decoding method (``decoder.combine(full, outlier)``).

    ``prompt`` is the :class:`OutlierPrompt`, or a function returning it, called at the first forward
    call (the original LLaVA code prunes inside its own ``generate``, so which tokens the LM sees - and
    so which may be outliers - is known only then). ``cache_key`` names the cache argument of the
    ``forward`` the session receives."""

    def __init__(self, decoder, prompt, cache_key: str = "cache"):
        self.decoder = decoder
        self._prompt = prompt
        self.cache_key = cache_key
        self.full_len = None  # length of the full prompt, seen at the first call
        self.cache = None  # generate's cache once the outlier rows have joined it
        self.pad = 0  # left padding of the outlier rows in the joined cache

    @property
    def prompt(self) -> OutlierPrompt:
        if not isinstance(self._prompt, OutlierPrompt):
            self._prompt = self._prompt()
        return self._prompt

    @property
    def rows(self) -> int:
        return self.prompt.attention_mask.shape[0]

    def around(self, patcher, generate):
        """``generate`` with this session active on ``patcher`` (its forward wrapper reads ``patcher._session``)."""
        def run(**kw):
            patcher._session = self
            try:
                return generate(**kw)
            finally:
                patcher._session = None
                self.close()

        return run

    # -- one forward call of generate -------------------------------------------------------------
    def forward(self, original, kw: dict):
        ids = kw.get("input_ids")
        tokens = ids if ids is not None else kw.get("inputs_embeds")
        if tokens is None or (ids is None and self.full_len is not None):
            raise VlpruneError(f"method={self.decoder.name!r} generates from input_ids (inputs_embeds alone is not supported)")
        if tokens.shape[0] != self.rows:
            raise VlpruneError(
                f"method={self.decoder.name!r} generates one sequence per prompt: num_beams=1 and "
                f"num_return_sequences=1 (got {tokens.shape[0]} rows for {self.rows} prompts)")
        cache = kw.get(self.cache_key)
        if self.full_len is None:
            if cache is not None and cache.get_seq_length() > 0:
                raise VlpruneError(f"method={self.decoder.name!r} cannot continue from a filled cache; start generate() "
                                   "from the whole prompt")
            self.full_len = tokens.shape[1]
        if self.cache is None:  # prefill (or, without a cache, every step): the two prompts apart
            out = original(**kw)
            other = original(**self._outlier_call(kw, ids))
            if cache is not None:
                self._join(cache, other.cache)
            out.logits = self.decoder.combine(out.logits[:, -1], other.logits[:, -1]).unsqueeze(1)
            return out
        out = original(**self._joint_call(kw, ids))
        b = self.rows
        out.logits = self.decoder.combine(out.logits[:b, -1], out.logits[b:, -1]).unsqueeze(1)
        return out

    def _outlier_call(self, kw, ids):
        """The outlier prompt, followed by the tokens generated so far (none at prefill)."""
        p = self.prompt
        mask = p.attention_mask
        new = ids[:, self.full_len:] if ids is not None else mask[:, :0]
        t = new.shape[1]
        full_mask = kw.get("attention_mask")
        new_mask = full_mask[:, self.full_len:] if full_mask is not None else torch.ones_like(new)
        steps = torch.arange(t, device=new.device)
        call = {k: v for k, v in kw.items() if k not in PROMPT_KEYS}
        call.update(p.extra)
        if p.inputs_embeds is not None:
            if t:  # generate() itself keeps a cache whenever it starts from embeddings
                raise VlpruneError(f"method={self.decoder.name!r} on a model that generates from embeddings needs "
                                   "the KV cache (use_cache=True)")
            call["inputs_embeds"] = p.inputs_embeds
        else:
            call["input_ids"] = torch.cat([p.input_ids, new], 1)
        call.update(attention_mask=torch.cat([mask, new_mask.to(mask.dtype)], 1),
                    position_ids=torch.cat([p.position_ids, p.next_position + steps], 1),
                    use_cache=kw.get(self.cache_key) is not None)
        if "logits_to_keep" in kw:  # a forward that knows it: the outlier rows need their last position only
            call["logits_to_keep"] = 1
        return call

    def _join(self, cache, other):
        """Append the outlier rows' cache to generate's, left-padded to its length with (masked) zeros."""
        from transformers.cache_utils import DynamicLayer

        layers, theirs = getattr(cache, "layers", None), getattr(other, "layers", None)
        if layers is None or theirs is None or len(layers) != len(theirs) or any(
                type(a) is not DynamicLayer or type(b) is not DynamicLayer for a, b in zip(layers, theirs)):
            raise VlpruneError(f"method={self.decoder.name!r} needs the default dynamic KV cache (DynamicCache); "
                               f"got {type(cache).__name__}")
        self.pad = cache.get_seq_length() - other.get_seq_length()
        if self.pad < 0:
            raise RuntimeError("the outlier prompt is longer than the full prompt")
        for a, b in zip(layers, theirs):
            a.keys = torch.cat([a.keys, F.pad(b.keys, (0, 0, self.pad, 0))], 0)
            a.values = torch.cat([a.values, F.pad(b.values, (0, 0, self.pad, 0))], 0)
        self.cache = cache

    def _joint_call(self, kw, ids):
        """One decoding step of the 2B rows [full; outlier] on the joined cache."""
        p, b = self.prompt, self.rows
        q = ids.shape[1]
        total = self.cache.get_seq_length() + q  # key length of this step
        mask = kw.get("attention_mask")
        if mask is None:
            mask = torch.ones(b, total, dtype=p.attention_mask.dtype, device=ids.device)
        pos = kw.get("position_ids")
        if pos is None:
            pos = (mask.long().cumsum(-1) - 1)[:, -q:]
        done = total - q - self.full_len  # tokens generated before this step
        steps = torch.arange(done, done + q, device=ids.device)
        other_mask = torch.cat([mask.new_zeros(b, self.pad), p.attention_mask.to(mask.dtype), mask[:, self.full_len:]], 1)
        call = {k: v for k, v in kw.items() if k not in PROMPT_KEYS}
        call.update(input_ids=torch.cat([ids, ids]), attention_mask=torch.cat([mask, other_mask]),
                    position_ids=torch.cat([pos, p.next_position + steps]), **{self.cache_key: self.cache})
        return call

    def close(self):
        """Cut generate's cache back to the full rows."""
        if self.cache is not None:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[: self.rows], layer.values[: self.rows]
            self.cache = None
