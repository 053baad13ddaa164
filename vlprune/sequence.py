"""Rebuild an LM input sequence after some image placeholders are dropped (model-agnostic).

Every per-position tensor (ids, embeddings, attention mask, labels, position ids, token types) is
shortened with the same keep mask, so they stay consistent. When rows lose different numbers of
positions (a different number of images per prompt), rows are re-padded on the side the batch was
padded on (left unless the attention mask shows right padding).
"""
from __future__ import annotations

import torch

from .errors import VlpruneError


def placeholder_positions(image_mask: torch.Tensor, per_image: list[int] | int) -> list[torch.Tensor]:
    """Split the (row, col) placeholder positions, in row-major order, into one block per image."""
    pos = image_mask.nonzero()
    sizes = [per_image] * (pos.shape[0] // per_image) if isinstance(per_image, int) else list(per_image)
    if sum(sizes) != pos.shape[0] or (isinstance(per_image, int) and pos.shape[0] % per_image):
        want = sum(sizes) if not isinstance(per_image, int) else f"a multiple of {per_image}"
        raise VlpruneError(
            f"image features and placeholders do not match: input_ids hold {pos.shape[0]} image placeholder "
            f"tokens, the images need {want} (check that the processor expanded each image token)"
        )
    return list(pos.split(sizes))


def keep_mask(image_mask: torch.Tensor, blocks: list[torch.Tensor], kept: list[torch.Tensor]) -> torch.Tensor:
    """True for every text position and for the kept placeholder positions of each image."""
    keep = ~image_mask
    if blocks:
        chosen = torch.cat([blk[idx] for blk, idx in zip(blocks, kept)])
        keep[chosen[:, 0], chosen[:, 1]] = True
    return keep


def is_right_padded(attention_mask: torch.Tensor | None) -> bool:
    return attention_mask is not None and attention_mask.dim() == 2 and bool((attention_mask[:, -1] == 0).any())


def compact(keep: torch.Tensor, tensors: dict, right_padded: bool) -> dict:
    """Apply ``keep`` (B, L) to each ``name -> (tensor (B, L, ...), pad_value)``; None values pass through."""
    b, _ = keep.shape
    counts = keep.sum(1)
    new_len = int(counts.max())
    out = {}
    if bool((counts == new_len).all()):
        for name, (t, _pad) in tensors.items():
            out[name] = None if t is None else t[keep].view(b, new_len, *t.shape[2:])
        return out
    if "attention_mask" in tensors and tensors["attention_mask"][0] is None:  # re-padding needs a mask
        tensors = {**tensors, "attention_mask": (torch.ones_like(keep, dtype=torch.long), 0)}
    rank = keep.long().cumsum(1) - 1
    dest = rank if right_padded else rank + (new_len - counts).unsqueeze(1)
    rows = torch.arange(b, device=keep.device).unsqueeze(1).expand_as(keep)
    for name, (t, pad) in tensors.items():
        if t is None:
            out[name] = None
            continue
        new = torch.full((b, new_len, *t.shape[2:]), pad, dtype=t.dtype, device=t.device)
        new[rows[keep], dest[keep]] = t[keep]
        out[name] = new
    return out
