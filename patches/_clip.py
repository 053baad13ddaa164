"""Signal taps on a CLIP-style vision encoder (HF ``CLIPEncoderLayer``: ``self_attn.{q,k}_proj``).

Shared by every family whose tower is an HF CLIP encoder (LLaVA-1.5, LLaVA-NeXT, the original LLaVA
code). Forward hooks on the q and k projections see exactly the tensors the attention sees, whatever
attention implementation runs (SDPA stays SDPA), and the requested rows are computed from them in
O(N) memory. The taps only work while ``enabled()`` is true, i.e. inside a pruned call.
"""
from __future__ import annotations

from vlprune import signals as sig
from vlprune.errors import VlpruneError
from vlprune.methods.base import Signal

KINDS = ("cls_attention",)


def resolve_layer(layer: int, n_layers: int, what: str = "layer") -> int:
    if not -n_layers <= layer < n_layers:
        raise VlpruneError(
            f"{what}={layer} is out of range for a {n_layers}-layer vision encoder "
            f"(allowed {-n_layers}..{n_layers - 1}; negative counts from the end)"
        )
    return layer % n_layers


class ClipTaps:
    def __init__(self, layers, requests: list[Signal], ledger, enabled):
        self.values: dict[Signal, object] = {}
        self._enabled = enabled
        by_layer: dict[int, list[Signal]] = {}
        for req in requests:
            if req.kind not in KINDS:
                raise VlpruneError(f"signal kind {req.kind!r} is not available on CLIP encoders (available: {', '.join(KINDS)})")
            by_layer.setdefault(resolve_layer(req.layer, len(layers)), []).append(req)
        for idx, reqs in by_layer.items():
            attn = layers[idx].self_attn
            state = {}
            ledger.hook(attn.q_proj.register_forward_hook(self._keep_q(state)))
            ledger.hook(attn.k_proj.register_forward_hook(self._on_k(state, attn, reqs)))

    def _keep_q(self, state):
        def hook(_module, _inputs, output):
            if self._enabled():
                state["q"] = output

        return hook

    def _on_k(self, state, attn, reqs):
        def hook(_module, _inputs, output):
            q = state.pop("q", None)
            if q is None or not self._enabled():
                return
            b, n, _ = output.shape
            q = q.view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
            k = output.view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
            row = None
            for req in reqs:
                if req.kind == "cls_attention":
                    row = sig.cls_attention(q, k, attn.scale) if row is None else row
                    self.values[req] = row[..., 1:]  # patch keys only, not renormalised

        return hook

    def take(self) -> dict:
        values, self.values = self.values, {}
        return values
