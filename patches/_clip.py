"""Signal taps on a CLIP-style vision encoder (HF ``CLIPEncoderLayer``: ``self_attn.{q,k,v}_proj``).

Also serves towers laid out the same way under other names: ``encoder.layer[i].attention.{q,k,v}_proj``
(HF ``Dinov2Model``, with ``num_attention_heads`` and ``scaling``); see ``encoder_layers`` and ``attention``.

Shared by every family whose tower is an HF CLIP encoder (LLaVA-1.5, LLaVA-NeXT, the original LLaVA
code). Forward hooks on the q/k/v projections see exactly the tensors the attention sees, whatever
attention implementation runs (SDPA stays SDPA), and the requested signals are computed from them
without an N x N matrix. The taps only work while ``enabled()`` is true, i.e. inside a pruned call.
Token 0 is the [CLS] token; every signal is returned over the patch tokens 1..N only. ``OpenClipTaps``
computes the same signals on open_clip towers, whose attention fuses the q/k/v projections.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from vlprune import signals as sig
from vlprune.errors import VlpruneError
from vlprune.builtin_methods.base import Signal

QK_KINDS = ("cls_attention", "cls_attention_joint", "attention_received", "keys", "cls_query", "cls_key")
V_KINDS = ("values", "cls_value")
KINDS = QK_KINDS + V_KINDS


def resolve_layer(layer: int, n_layers: int, what: str = "layer") -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
        raise VlpruneError(
            f"{what}={layer} is out of range for a {n_layers}-layer vision encoder "
            f"(allowed {-n_layers}..{n_layers - 1}; negative counts from the end)"
        )
    return layer % n_layers


def encoder_layers(tower):
    """The vision encoder's list of layers: ``encoder.layers`` (CLIP, SigLIP) or ``encoder.layer`` (DINOv2)."""
    encoder = getattr(tower, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if layers is None:
        layers = getattr(encoder, "layer", None)
    if layers is None or not len(layers) or attention(layers[0]) is None:
        raise VlpruneError(
            f"a {type(tower).__name__} vision tower is not supported; supported: CLIP-style towers whose "
            "encoder.layers[i].self_attn (CLIPVisionModel / SiglipVisionModel) or encoder.layer[i].attention "
            "(Dinov2Model) has q_proj/k_proj/v_proj")
    return layers


def attention(layer):
    """A layer's self-attention module with ``q_proj``/``k_proj``/``v_proj``, or None."""
    for name in ("self_attn", "attention"):
        attn = getattr(layer, name, None)
        if attn is not None and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")):
            return attn
    return None


def _num_heads(attn) -> int:
    return attn.num_heads if hasattr(attn, "num_heads") else attn.num_attention_heads


def _scale(attn) -> float:
    return attn.scale if hasattr(attn, "scale") else attn.scaling


def heads(x, attn):
    """(B, T, heads*head_dim) projection output -> (B, heads, T, head_dim)."""
    b, t, _ = x.shape
    return x.view(b, t, _num_heads(attn), attn.head_dim).transpose(1, 2)


def qk_signal(kind: str, q, k, scale: float, key_mask=None):
    """One signal from full (B, heads, 1+N, head_dim) queries and keys; [CLS] is token 0. ``key_mask``
    (B, 1+N) marks the real keys of a padded batch (only in-encoder methods' [CLS] rows meet one)."""
    if key_mask is not None and kind != "cls_attention":
        raise VlpruneError(f"signal kind {kind!r} cannot be read from a padded batch (only cls_attention can)")
    if kind == "cls_attention":
        return sig.cls_attention(q, k, scale, key_mask=key_mask)[..., 1:]
    if kind == "cls_attention_joint":
        return sig.joint_cls_attention(q, k)[..., 1:]
    if kind == "attention_received":
        return sig.attention_received(q, k, scale)[..., 1:]
    if kind == "keys":
        return k[:, :, 1:].float()
    if kind == "cls_query":
        return q[:, :, 0].float()
    if kind == "cls_key":
        return k[:, :, 0].float()
    raise AssertionError(kind)


class ClipTaps:
    """Forward hooks computing ``requests`` on ``layers`` while ``enabled()``; ``key_mask()``, if given,
    returns the (B, 1+N) real keys of a padded batch (or None) for the [CLS] rows."""

    def __init__(self, layers, requests: list[Signal], ledger, enabled, key_mask=None):
        self.values: dict[Signal, object] = {}
        self._enabled = enabled
        self._key_mask = key_mask or (lambda: None)
        by_layer: dict[int, list[Signal]] = {}
        for req in requests:
            if req.kind not in KINDS:
                raise VlpruneError(f"signal kind {req.kind!r} is not available on CLIP encoders (available: {', '.join(KINDS)})")
            by_layer.setdefault(resolve_layer(req.layer, len(layers)), []).append(req)
        for idx, reqs in by_layer.items():
            attn = attention(layers[idx])
            state = {}
            qk = [r for r in reqs if r.kind in QK_KINDS]
            vs = [r for r in reqs if r.kind in V_KINDS]
            if qk:
                ledger.hook(attn.q_proj.register_forward_hook(self._keep_q(state)))
                ledger.hook(attn.k_proj.register_forward_hook(self._on_k(state, attn, qk)))
            if vs:
                ledger.hook(attn.v_proj.register_forward_hook(self._on_v(attn, vs)))

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
            q, k = heads(q, attn), heads(output, attn)
            mask = self._key_mask()
            for req in reqs:
                self.values[req] = qk_signal(req.kind, q, k, _scale(attn), mask)

        return hook

    def _on_v(self, attn, reqs):
        def hook(_module, _inputs, output):
            if self._enabled():
                v = heads(output, attn)
                for req in reqs:
                    self.values[req] = v[:, :, 1:].float() if req.kind == "values" else v[:, :, 0].float()

        return hook

    def take(self) -> dict:
        values, self.values = self.values, {}
        return values


class OpenClipTaps:
    """Signals of the open_clip blocks a method reads, from each attention module's input (ln_1 applied)
    and its fused in-projection (``nn.MultiheadAttention``-style ``in_proj_weight``)."""

    def __init__(self, blocks, requests, ledger, active, key_mask=None):
        """``key_mask()``, if given, returns the (B, 1+N) real keys of a padded batch (or None), as for ClipTaps."""
        self.values: dict = {}
        self.macs = 0  # multiply-accumulates spent on signals in the current call
        self._active = active
        self._key_mask = key_mask or (lambda: None)
        by_layer: dict[int, list] = {}
        for req in requests:
            if req.kind not in KINDS:
                raise VlpruneError(f"signal kind {req.kind!r} is not available on open_clip towers "
                                   f"(available: {', '.join(KINDS)})")
            by_layer.setdefault(resolve_layer(req.layer, len(blocks)), []).append(req)
        for idx, reqs in by_layer.items():
            hook = functools.partial(self._on_input, reqs)
            ledger.hook(blocks[idx].attn.register_forward_pre_hook(hook, with_kwargs=True))

    def _on_input(self, reqs, attn, args, kwargs):
        if not self._active():
            return None
        x = args[0] if args else kwargs.get("query", kwargs.get("x"))  # (B, T, D), ln_1 already applied
        b, t, d = x.shape
        heads = attn.num_heads
        head_dim = d // heads
        weight, bias = attn.in_proj_weight, attn.in_proj_bias

        def project(part: int, rows):  # part 0/1/2 = q/k/v slice of the fused projection
            self.macs += rows.shape[0] * rows.shape[1] * d * d
            w = weight[part * d:(part + 1) * d]
            return F.linear(rows, w, None if bias is None else bias[part * d:(part + 1) * d])

        def split(y):  # (B, T', D) -> (B, heads, T', head_dim)
            return y.view(b, y.shape[1], heads, head_dim).transpose(1, 2)

        kinds = {r.kind for r in reqs}
        qk = [r for r in reqs if r.kind not in ("values", "cls_value")]
        if qk:
            # the [CLS] row is all most signals need; attention_received needs every query
            q = split(project(0, x if "attention_received" in kinds else x[:, :1]))
            k = split(project(1, x))
            q = getattr(attn, "ln_q", torch.nn.Identity())(q)  # open_clip Attention's optional qk-norm
            k = getattr(attn, "ln_k", torch.nn.Identity())(k)
            mask = self._key_mask()
            for req in qk:
                self.values[req] = qk_signal(req.kind, q, k, head_dim ** -0.5, mask)
                if req.kind in ("cls_attention", "attention_received"):  # the logits q . K^T
                    self.macs += b * q.shape[2] * t * d
        if kinds & {"values", "cls_value"}:
            v = split(project(2, x))
            for req in reqs:
                if req.kind == "values":
                    self.values[req] = v[:, :, 1:].float()
                elif req.kind == "cls_value":
                    self.values[req] = v[:, :, 0].float()
        return None

    def take(self) -> dict:
        values, self.values = self.values, {}
        return values
