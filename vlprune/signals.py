"""Signals computed from an attention layer's queries and keys, without ever forming N x N.

Every function takes ``q`` and ``k`` shaped (B, heads, N, head_dim) as the attention saw them (after
any rotary embedding) and returns float32. Nothing here touches a model: patchers feed these from hooks.
"""
from __future__ import annotations

import torch


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float, query_index: int = 0,
                  key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention row of one query (the [CLS] token by default) over all N keys: (B, heads, N).

    Equal to row ``query_index`` of the eager attention probabilities, but O(N) memory: one query
    against the keys. Computed in float32 so bf16 models rank tokens as the fp32 reference does.
    ``key_mask`` (B, N) hides the False keys (a padded batch's padding), as the attention mask does.
    """
    q0 = q[:, :, query_index : query_index + 1, :].float()
    logits = torch.matmul(q0, k.float().transpose(-1, -2)).squeeze(-2) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1)


def joint_cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The [CLS] row with every head taken as one: softmax(q0 . k / sqrt(width)) over the full-width
    (heads x head_dim) query and keys, (B, 1, N), in O(N). DAMRO's released code ranks outliers so."""
    heads, dim = q.shape[1], q.shape[-1]
    logits = torch.einsum("bhd,bhtd->bt", q[:, :, 0].float(), k.float()) / (heads * dim) ** 0.5
    return torch.softmax(logits, dim=-1).unsqueeze(1)


def attention_received(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 256) -> torch.Tensor:
    """Mean over queries (and heads kept apart) of the attention each key receives: (B, heads, N).

    Queries are processed in chunks, so peak memory is O(chunk x N) rather than O(N^2).
    """
    b, h, n, _ = q.shape
    total = torch.zeros(b, h, n, dtype=torch.float32, device=q.device)
    kt = k.float().transpose(-1, -2)
    for start in range(0, n, chunk):
        probs = torch.softmax(torch.matmul(q[:, :, start : start + chunk].float(), kt) * scale, dim=-1)
        total += probs.sum(dim=-2)
    return total / n
