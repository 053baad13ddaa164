"""open_clip ``VisionTransformer`` (CLIP ViT image towers): fewer patch tokens inside the tower, survivors out.

Patch an open_clip ``CLIP`` / ``CustomTextCLIP`` or its ``model.visual`` directly::

    handle = vlprune.patch(model, "fastervlm", ratio=0.75, layer=5)  # blocks 6.. run on [CLS] + 12 of 49
    emb = model.encode_image(images)                                 # same shape as unpatched
    tokens, kept = kept_tokens(handle)                               # (B, k, D) survivors, (B, k) raster ids

Two uses, one mechanism. (a) ``encode_image`` gets cheaper: patch tokens leave the residual stream between
blocks, so every later block runs on [CLS] + k tokens; [CLS] is never dropped, so the pooled embedding keeps
its shape ('tok' pooling reads [CLS]; 'avg' pooling averages the survivors). (b) A downstream VLM gets the
k surviving patch tokens (:func:`kept_tokens`, exactly what open_clip returns as ``tokens`` with
``output_tokens=True``: after ``ln_post`` unless ``final_ln_after_pool``) and their raster indices
(``handle.last[i].kept``, ascending).

Where the drop happens (the "cut"):
- stage ``encoder``/``projector`` methods choose once, among the outputs of the deepest block whose signals
  they read, so their score and their tokens come from the same layer (as on LLaVA): ``fastervlm`` with
  ``layer=L`` scores with block L's [CLS] attention and blocks L+1.. see k tokens; ``layer=-1`` only trims the
  returned tokens. Methods that read no signal (``random``, ``uniform``, ``pool``, ``divprune``) need no block
  at all, so they cut before block 0: ``random`` is FLIP-style patch dropout, ``pool`` a coarser grid.
  The whole batch is cut at once (the same k for every image).
- stage ``in_encoder`` (``flowcut``) prunes progressively after the blocks of ``encoder_plan(last block)``,
  the whole batch at once (images whose adaptive counts differ are padded, the padding masked in attention);
  the last block runs on [CLS] + k.

Signals. A forward pre-hook on each needed block's attention sees its input (``ln_1(x)``) and recomputes
only what was asked from the fused in-projection (``in_proj_weight``/``in_proj_bias``): the [CLS] query
(one row), the keys (and values for FlowCut), then the [CLS] attention row in O(N) - never the N x N
matrix, never a second attention pass; the attention itself still runs ``need_weights=False`` (fused/SDPA).
Cost: one extra (N, D) x (D, D) product per key/value request plus the row itself, counted in
``handle._patcher.signal_macs`` (and by ``vlprune.eval.flops.open_clip_vit_flops``).

Only ``forward`` of the tower (hence ``encode_image`` and ``model(image, text)``) is pruned;
``forward_intermediates`` runs unpruned. Not served: attentional pooling (CoCa-style; its outputs are
pooler queries, not patch tokens), ``pool_type='none'`` (the output length would follow k), training-mode
patch dropout (tokens would no longer be raster-indexed), timm / ResNet towers, scaled-cosine attention.
"""
from __future__ import annotations

import functools

import torch

from vlprune.errors import VlpruneError
from vlprune.builtin_methods.base import Selection
from vlprune.patcher import Patcher
from vlprune.registry import register_patcher

from ._clip import OpenClipTaps, resolve_layer
from ._tower import apply_cut
from ._wrap import wrap_method

_BLOCK_OUTPUTS = ("substitute: selects among the tower's block outputs (open_clip has no per-token projector); "
                  "cuts after the deepest block its signals read, or before block 0 when it reads none")

_NO_LM = "no: acts inside a language model's decoder; an open_clip image tower has none"


#: what an open_clip tower serves (``Patcher.provides``): cuts between blocks, no language model
PROVIDES = {
    **dict.fromkeys(("encoder", "in_encoder", "merges", "cls_attention", "cls_attention_joint", "attention_received",
                     "keys", "values", "cls_query", "cls_key", "cls_value", "projector/no_signals"), "yes"),
    "projector": _BLOCK_OUTPUTS,
    "no_signals": "substitute: reads no signal, so it selects among (or pools) the patch embeddings before block 0 "
                  "(dropping them is FLIP-style patch dropout; pooling, a coarser grid)",
    "llm": _NO_LM,
    "decoding": "no: contrastive decoding needs a language model; an open_clip image tower has none",
}


def vision_tower(model):
    """The open_clip ``VisionTransformer`` of ``model`` (a CLIP, CustomTextCLIP or the tower itself), checked."""
    visual = getattr(model, "visual", model)
    name = type(visual).__name__
    if name != "VisionTransformer" or not hasattr(visual, "transformer") or not hasattr(visual, "class_embedding"):
        raise VlpruneError(
            f"the open_clip patcher serves open_clip VisionTransformer image towers; this model's tower is "
            f"{type(visual).__module__}.{name} (timm and ModifiedResNet towers are not supported)")
    if getattr(visual, "attn_pool", None) is not None:
        raise VlpruneError("open_clip towers with attentional pooling (attentional_pool=True, CoCa-style) are not "
                           "supported: their outputs are pooler queries, not patch tokens (supported pool_type: "
                           "'tok', 'avg')")
    if visual.pool_type not in ("tok", "avg"):
        raise VlpruneError(f"pool_type={visual.pool_type!r} is not supported (supported: 'tok', 'avg'): with 'none' "
                           "the tower's output length would follow the number of kept tokens")
    if not getattr(visual.transformer, "batch_first", True):
        raise VlpruneError("open_clip towers whose transformer runs sequence-first (batch_first=False) are not supported")
    for i, block in enumerate(visual.transformer.resblocks):
        attn = getattr(block, "attn", None)
        if getattr(attn, "in_proj_weight", None) is None:
            raise VlpruneError(f"block {i} of the tower has no fused in-projection (attn.in_proj_weight); supported: "
                               "nn.MultiheadAttention with equal q/k/v sizes and open_clip's Attention")
        if getattr(attn, "bias_k", None) is not None or getattr(attn, "add_zero_attn", False):
            raise VlpruneError(f"block {i}: attention with add_bias_kv/add_zero_attn is not supported")
        if getattr(attn, "scaled_cosine", False):
            raise VlpruneError(f"block {i}: scaled-cosine attention is not supported (its logits are not q.k*scale)")
        if not getattr(attn, "batch_first", True):
            raise VlpruneError(f"block {i}: nn.MultiheadAttention(batch_first=False) is not supported")
    return visual


@register_patcher("CLIP", "CustomTextCLIP", "VisionTransformer")
class OpenClipViT(Patcher):
    """open_clip ViT towers: a cut (or FlowCut's progressive cuts) between blocks; see the module docstring."""

    provides = PROVIDES

    def __init__(self, model, handle):
        super().__init__(model, handle)
        method = handle.method
        self.visual = vision_tower(model)  # checked before the model is touched
        self.blocks = self.visual.transformer.resblocks
        self.grid = tuple(self.visual.grid_size)
        self.n_patches = self.grid[0] * self.grid[1]
        n = len(self.blocks)
        if method.stage == "in_encoder":
            self.plan = method.encoder_plan(n - 1)  # the last block's output is pooled
            if not self.plan or self.plan[0] < 0 or self.plan[-1] >= n - 1:
                raise VlpruneError(f"method={method.name!r} planned prune layers {self.plan}, which must lie in "
                                   f"0..{n - 2} (before the last of the tower's {n} blocks)")
            self.requests = [s for layer in self.plan for s in method.encoder_signals(layer)]
        else:
            self.requests = method.signals()
        read = [resolve_layer(s.layer, n, f"{s.kind} layer") for s in self.requests]
        # stage encoder/projector: prune the input of this block (n: the tower's output)
        self.cut = max(read) + 1 if read else 0
        self._call = None  # per-call state while a pruned forward runs
        self.tokens = None  # (B, k, D) kept patch tokens of the last pruned call
        self.signal_macs = 0  # multiply-accumulates spent on signals in the last call

    def install(self):
        owner = self.visual.__dict__.get("_vlprune_owner")
        if owner is not None and owner is not self.handle:
            owner.remove()  # the tower patched through another object (CLIP vs its .visual): replace, never stack
        self.ledger.set_attr(self.visual, "_vlprune_owner", self.handle)
        self.taps = OpenClipTaps(self.blocks, self.requests, self.ledger, lambda: self._pruning,
                                 key_mask=lambda: self._call["real"] if self._call else None)
        if self.handle.method.stage == "in_encoder":
            for layer in self.plan:
                hook = functools.partial(self._between_blocks, layer)
                self.ledger.hook(self.blocks[layer + 1].register_forward_pre_hook(hook, with_kwargs=True))
        elif self.cut < len(self.blocks):
            self.ledger.hook(self.blocks[self.cut].register_forward_pre_hook(self._before_block, with_kwargs=True))
        else:
            self.ledger.hook(self.blocks[-1].register_forward_hook(self._after_last_block))
        wrap_method(self, self.visual, "_pool", self._pool)
        wrap_method(self, self.visual, "forward", self._forward)

    @property
    def _pruning(self) -> bool:
        return self._call is not None and self._call["prune"]

    # -- hooks ------------------------------------------------------------------------------------
    def _cut_tokens(self, hidden):
        """[CLS] + the method's k survivors among the patch tokens of ``hidden`` (B, 1+N, D)."""
        call = self._call
        patches = hidden[:, 1:]
        survivors, sel = self.prune(patches, self.grid, self.taps.take(), call["k"])
        call["selection"] = sel
        return torch.cat([hidden[:, :1], survivors.to(hidden.dtype)], dim=1)

    def _before_block(self, _module, args, kwargs):
        if not self._pruning:
            return None
        if args:
            return (self._cut_tokens(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "q_x": self._cut_tokens(kwargs["q_x"])}

    def _after_last_block(self, _module, _args, output):
        return self._cut_tokens(output) if self._pruning else None

    def _between_blocks(self, layer, _module, args, kwargs):
        """FlowCut: the decision made after block ``layer`` applied at the next block's input, the whole
        batch at once: images that keep different counts are padded to the longest, real tokens first,
        and the padding is hidden from attention (``attn_mask``) and from the [CLS] rows the taps read."""
        if not self._pruning:
            return None
        hidden = args[0] if args else kwargs["q_x"]
        call = self._call
        keep, call["score"], counts = self.handle.method.encoder_step(
            layer, self.plan[-1] - layer, self.taps.take(), call["score"], call["k"], call["counts"])
        if keep is not None:  # the real tokens and the mask hiding the padding change only at a cut
            hidden = apply_cut(call, hidden, keep, counts)
            if call["mask"] is not None:  # (B, 1, T, T) -> the (B * heads, T, T) the blocks take
                call["mask"] = call["mask"].expand(-1, self.blocks[0].attn.num_heads, -1, -1).flatten(0, 1)
        if keep is None and call["mask"] is None:  # the method only updated its running score
            return None
        if len(args) >= 4:  # (q_x, k_x, v_x, attn_mask): open_clip's checkpointed call
            return (hidden, args[1], args[2], call["mask"], *args[4:]), kwargs
        kwargs = {**kwargs, "attn_mask": call["mask"]}
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "q_x": hidden}

    def _pool(self, original, kw):
        pooled, tokens = original(**kw)
        if self._call is not None:
            self._call["tokens"] = tokens
        return pooled, tokens

    # -- the pruned call --------------------------------------------------------------------------
    def _forward(self, original, kw):
        if not self.enabled:
            return original(**kw)
        x = kw["x"]
        if self.visual.training and not isinstance(self.visual.patch_dropout, torch.nn.Identity):
            raise VlpruneError("the tower is in training mode with patch_dropout > 0, which drops patches at "
                               "random before vlprune sees them; call model.eval() (or patch_dropout=0)")
        n = self.n_patches
        k = self.keep_count(n)
        self.taps.macs = 0
        self._call = {"prune": k < n, "k": k, "tokens": None, "score": None, "counts": None, "real": None,
                      "mask": None, "orig": torch.arange(n, device=x.device).expand(x.shape[0], -1), "selection": None}
        try:
            output = original(**kw)
            call = self._call
        finally:
            self._call = None
            self.taps.take()
        self.tokens = call["tokens"]
        # the identity and FlowCut keep their survivors' original indices in "orig" (FlowCut: indices only,
        # its scores cover the survivors, not all N)
        sel = call["selection"] or Selection(call["orig"])
        self.handle.last = self.records(list(range(x.shape[0])), n, min(k, n), sel)
        self.signal_macs = self.taps.macs
        return output


def kept_tokens(handle) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, k, D), indices (B, k)) of the last pruned call of an open_clip patch, for a downstream VLM.

    ``tokens`` are what open_clip itself returns as the tower's ``tokens`` (``output_tokens=True``): the last
    block's output at the kept patches, after ``ln_post`` unless the tower has ``final_ln_after_pool``.
    ``indices`` are their positions in the tower's patch grid, ascending raster order (row-major over
    ``visual.grid_size``); row i of both belongs to image i of the batch.
    """
    patcher = getattr(handle, "_patcher", None)
    if not isinstance(patcher, OpenClipViT):
        raise VlpruneError("kept_tokens(handle) needs the handle vlprune.patch returned for an open_clip model "
                           f"(CLIP, CustomTextCLIP or VisionTransformer); got {handle!r}")
    if patcher.tokens is None or not handle.last:
        raise VlpruneError("no pruned call yet: run model.encode_image(images) (or the tower) with the patch "
                           "active and enabled, then ask for kept_tokens(handle)")
    return patcher.tokens, torch.stack([rec.kept for rec in handle.last])
