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
    pos = image_mask.nonzero()  # host sync: where the images sit decides every shape of the shortened call
    sizes = [per_image] * (pos.shape[0] // per_image) if isinstance(per_image, int) else list(per_image)
    if sum(sizes) != pos.shape[0] or (isinstance(per_image, int) and pos.shape[0] % per_image):
        want = sum(sizes) if not isinstance(per_image, int) else f"a multiple of {per_image}"
        raise VlpruneError(
            f"image features and placeholders do not match: input_ids hold {pos.shape[0]} image placeholder "
            f"tokens, the images need {want} (check that the processor expanded each image token)"
        )
    return list(pos.split(sizes))


def block_rows(blocks: list[torch.Tensor]) -> list[int]:
    """The prompt row of each image block (its record names it)."""
    if not blocks:
        return []
    return torch.stack([b[0, 0] for b in blocks]).tolist()  # host sync: one small copy, after the placeholder search


def keep_mask(image_mask: torch.Tensor, blocks: list[torch.Tensor], kept: list[torch.Tensor]) -> torch.Tensor:
    """True for every text position and for the kept placeholder positions of each image."""
    keep = ~image_mask
    if blocks:
        chosen = torch.cat([blk[idx] for blk, idx in zip(blocks, kept)])
        keep[chosen[:, 0], chosen[:, 1]] = True
    return keep


def is_right_padded(attention_mask: torch.Tensor | None) -> torch.Tensor | bool:
    """Whether the batch is padded on the right (some row's last position is padding): a 0-d bool
    tensor, left on the device, or False without a 2-D mask."""
    if attention_mask is None or attention_mask.dim() != 2:
        return False
    return (attention_mask[:, -1] == 0).any()


def compact(keep: torch.Tensor, tensors: dict, right_padded: torch.Tensor | bool) -> dict:
    """Apply ``keep`` (B, L) to each ``name -> (tensor (B, L, ...), pad_value)``; None values pass through.

    Rows that keep fewer positions than the longest are re-padded on the side ``right_padded`` says
    (an attention mask is made for them if the caller gave none). Positions move by one scatter, so the
    only host synchronisation is the new length."""
    b, _ = keep.shape
    counts = keep.sum(1)
    totals = torch.stack([counts.max(), counts.min()]).tolist()  # host sync: the new length is the new shape
    new_len, ragged = totals[0], totals[0] != totals[1]
    if ragged and "attention_mask" in tensors and tensors["attention_mask"][0] is None:
        tensors = {**tensors, "attention_mask": (torch.ones_like(keep, dtype=torch.long), 0)}
    rank = keep.long().cumsum(1) - 1
    shift = torch.where(torch.as_tensor(right_padded, device=keep.device), 0, new_len - counts).unsqueeze(1)
    dest = torch.where(keep, rank + shift, new_len)  # dropped positions land in a spare last slot
    out = {}
    for name, (t, pad) in tensors.items():
        if t is None:
            out[name] = None
            continue
        index = dest.view(b, -1, *[1] * (t.dim() - 2)).expand_as(t)
        new = torch.full((b, new_len + 1, *t.shape[2:]), pad, dtype=t.dtype, device=t.device)
        out[name] = new.scatter_(1, index, t)[:, :new_len].contiguous()
    return out


def leading(counts: list[int], t: int, device) -> torch.Tensor:
    """(B, t) True for each row's first ``counts[i]`` positions (a padded batch's real tokens come first)."""
    return torch.arange(t, device=device) < torch.tensor(counts, device=device)[:, None]


def real_tokens(counts: list[int] | None, t: int, device) -> torch.Tensor | None:
    """(B, 1 + t) True for [CLS] and each row's first ``counts[i]`` patch tokens, the real ones of a padded
    batch; None when no row is padded."""
    if counts is None or min(counts) == t:
        return None
    real = leading(counts, t, device)
    return torch.cat([real.new_ones(real.shape[0], 1), real], dim=1)


def padding_mask(real: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive attention mask (B, 1, T, T) that hides the keys ``real`` (B, T) marks False (a padded
    batch's padding); None when ``real`` is None (no row is padded)."""
    if real is None:
        return None
    mask = torch.zeros(real.shape, dtype=dtype, device=real.device).masked_fill(~real, torch.finfo(dtype).min)
    return mask[:, None, None, :].expand(-1, 1, real.shape[1], -1)


def with_caller_prompt(out, prompt: torch.Tensor, short: torch.Tensor):
    """``generate``'s output on the shortened prompt ``short`` with the caller's ``prompt`` put back in
    front of the new tokens (the unpatched output contract). ``out`` is ids or a generate output with
    ``sequences``; with ``num_return_sequences`` > 1 each prompt row stands for its consecutive copies,
    as generate expands them."""
    seqs = out.sequences if hasattr(out, "sequences") else out
    copies = seqs.shape[0] // prompt.shape[0]
    full = torch.cat([prompt.repeat_interleave(copies, dim=0), seqs[:, short.shape[1]:]], dim=1)
    if hasattr(out, "sequences"):
        out.sequences = full
        return out
    return full
