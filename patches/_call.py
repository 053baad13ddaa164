"""The sequence side of a pruned HF call, written once for every family that shortens the LM's input.

A family decides which positions survive (a keep mask) and encodes the survivors; from there the call is
the same everywhere: every per-position tensor is shortened with that one mask (rows re-padded on the
side the caller padded), and ``generate`` runs on the short prompt with ``max_length`` counted as the
caller counted it and the caller's own prompt ids put back in front of the new tokens.
"""
from __future__ import annotations

import torch

from vlprune.sequence import compact, is_right_padded, with_caller_prompt

#: what a dropped position is re-padded with, per argument (``input_ids``: the family's free pad id)
PADS = {"inputs_embeds": 0.0, "attention_mask": 0, "labels": -100, "position_ids": 0}


def free_pad_id(pad_token_id: int | None, special: set[int]) -> int:
    """The LM's pad id, unless it is missing or one of ``special`` (placeholders): then the smallest id
    that is not, so a re-padded position is never read as an image."""
    if pad_token_id is not None and pad_token_id not in special:
        return pad_token_id
    return min(set(range(len(special) + 1)) - special)


def shorten(kw: dict, keep: torch.Tensor, pad_id: int, extra: dict | None = None) -> tuple[dict, dict]:
    """``kw`` with every per-position tensor (B, L, ...) cut to the positions ``keep`` (B, L) marks: ids,
    embeddings, mask, labels, position ids and any other tensor of that shape (token types, ...). The
    mask always takes part (re-padded rows need one even when the caller passed none). ``extra`` name ->
    (tensor, pad) are shortened alike and returned apart. Returns (kwargs, shortened extras)."""
    kw = dict(kw)
    pads = dict(PADS, input_ids=pad_id)
    tensors = {name: (kw.get(name), pad) for name, pad in pads.items() if name in kw or name == "attention_mask"}
    for name, value in kw.items():
        if name not in tensors and torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == keep.shape:
            tensors[name] = (value, 0)
    short = compact(keep, {**tensors, **(extra or {})}, is_right_padded(kw.get("attention_mask")))
    kw.update({name: short.pop(name) for name in tensors})
    return kw, short


def generate_short(original, kw: dict, prepare):
    """``generate`` of a pruned call: ``prepare(original, kw) -> (generate, kwargs, positions dropped)``
    shortens it (and may wrap ``generate``, as damro does); the LM generates on the short prompt and the
    caller gets back its prompt + the new ids."""
    inputs = kw.pop("inputs", None)
    if inputs is not None:
        kw["inputs_embeds" if inputs.is_floating_point() else "input_ids"] = inputs
    prompt = kw.get("input_ids")
    original, kw, dropped = prepare(original, kw)
    short = kw.get("input_ids")
    if short is prompt:  # the caller's ids reach the LM as they are (embeddings in: new tokens only, as unpatched)
        return original(**kw)
    if kw.get("max_length") is not None and kw.get("max_new_tokens") is None:
        kw["max_length"] -= dropped  # it counts the caller's (full) prompt; the LM sees a shorter one
    return with_caller_prompt(original(**kw), prompt, short)


def forward_short(patcher, original, kw: dict, images: int):
    """``forward`` of a pruned call with ``images`` images: stage "llm" drops inside the LM
    (``patcher._forward_llm``); otherwise a call with pixels runs on the sequence ``patcher._prepare``
    shortens; anything else (disabled, text only) runs as unpatched."""
    if patcher.enabled and patcher.handle.method.stage == "llm" and images:
        return patcher._forward_llm(original, kw)
    if not patcher.enabled or kw.get("pixel_values") is None:
        return original(**kw)
    kw, _ = patcher._prepare(kw, generating=False)
    return original(**kw)
