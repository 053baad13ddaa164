"""HF ``Qwen2_5_VLForConditionalGeneration`` (Qwen2.5-VL: windowed ViT without [CLS], 2x2 PatchMerger, M-RoPE).

Where pruning happens. The vision tower runs unchanged on every image (for ``in_encoder`` methods: on all
images at once, each on fewer tokens after each prune step). Selection acts on the **merged** tokens the PatchMerger
emits (one per 2x2 patch unit) - the "projector" point of this family - for methods of stage "encoder"
and "projector" alike, so merging methods (``visionzip``, ``prumerge_plus``, ``pool``) average merged
(projected) features here. Budgets, ``handle.last`` and kept indices count merged tokens; ``kept`` are
indices into the image's merged grid (``image_grid_thw`` h/2 x w/2) in **raster order**, ascending.

Order. The vision blocks run on a window-permuted sequence (the tower reorders 2x2 units so each window is
contiguous, and un-permutes the merger's output). Every signal is reduced per unit in that order and then
mapped back to the raster order of the merged grid with the inverse window permutation before a method
sees it.

Signals come from the vision blocks' q/k/v (``_qwen_vision.VisionTaps``); there is no [CLS] token, so
methods that ask for one get a documented substitute (see ``PROVIDES``).

Layers are literal block indices (0-based, negative from the end). The merger reads the last block, so the
LLaVA-style default ``-2`` is a windowed block on Qwen2.5-VL-7B (full attention in blocks 7/15/23/31); the
Qwen code of HoloV and HiPrune reads the last block (``layer=-1``; HiPrune ``deep_layer=-1,
object_layer=15``).

Positions. Survivors keep their original 3-D M-RoPE position ids (from ``get_rope_index`` on the full
sequence; never renumbered - ``positions="contiguous"`` does not apply to this family), and
``model.model.rope_deltas`` is set so that decoding continues at the original max position + 1. The LM
receives the shortened ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``labels`` and every other
per-position tensor cut with one keep mask; ``generate`` returns the caller's full prompt + new tokens.
``generate`` passes the 4-row ids it would build itself (a text row from the shortened mask over the three
M-RoPE rows) and extends them by one per new token. Calls need ``input_ids`` (not ``inputs_embeds``) with
``pixel_values`` and ``image_grid_thw``; videos are not pruned (a call with ``pixel_values_videos`` is an
error while the patch is enabled; ``handle.disabled()`` runs it unpruned).

Stage "llm" (``fastv``, ``visual_exit``): the shared decoder hooks of ``patches/_llm.py`` fit the Qwen2 text
decoder (M-RoPE reaches the layers as ordinary (B, L, head_dim) cos/sin tables, already mixed from the three
axes, so gathering them keeps each survivor's 3-D position); images of different sizes are chosen one by
one, and rows of a batch that keep different counts are evened out with masked fillers.
"""
from __future__ import annotations

import itertools

import torch

from vlprune.errors import VlpruneError
from vlprune.builtin_methods.base import Selection
from vlprune.patcher import YES, Patcher
from vlprune.registry import register_patcher
from vlprune.sequence import (
    block_rows,
    keep_mask,
    placeholder_positions,
)

from ._call import forward_short, free_pad_id, generate_short, shorten
from ._llm import LLMImage, LLMPruning
from ._qwen_vision import PER_UNIT, InEncoderPruning, VisionTaps, window_layout
from ._wrap import wrap_method

_RECEIVED = ("substitute: [CLS] attention -> the mean attention each merged token receives (as HoloV and HiPrune "
             "do on Qwen); in windowed blocks, such as the default layer -2, within windows (layer=-1: the last, "
             "full-attention block)")

_GLOBAL = "a global token: the mean of the image's patch {}"
#: what this family serves (``Patcher.provides``): no [CLS] token, so [CLS] signals have substitutes
PROVIDES = {
    **dict.fromkeys(("encoder", "projector", "llm", "attention_received", "keys", "values", "last_attention",
                     "image_attention", "text_attention",
                     "no_signals"), YES),
    "cls_attention": _RECEIVED,
    "cls_query": "substitute: [CLS] query/key -> " + _GLOBAL.format("queries/keys"),
    "cls_key": "substitute: [CLS] query/key -> " + _GLOBAL.format("queries/keys"),
    "cls_value": "substitute: [CLS] value -> " + _GLOBAL.format("values"),
    # in-encoder pruning follows FlowCut's Qwen recipe: every [CLS] signal is the global token's
    "in_encoder": "substitute: [CLS] -> a global token, the mean of the image's patch queries and values (FlowCut's "
                  "Qwen recipe); whole 2x2 units leave between vision blocks and the windows shrink with them",
    **dict.fromkeys(("in_encoder/cls_attention", "in_encoder/cls_query", "in_encoder/cls_key", "in_encoder/cls_value"),
                    YES),
    "merges": "substitute: merges average merged (projected) tokens",
    "cls_attention_joint": "no: no [CLS] token; a substitute is not what a joint-head [CLS] ranking means",
    "decoding": "no: contrastive decoding ranks outlier tokens by the [CLS] token's attention, which Qwen2.5-VL "
                "lacks; a substitute ranking (e.g. the mean attention received) is not what the outlier analysis "
                "rests on, so it is refused rather than approximated",
}

@register_patcher("Qwen2_5_VLForConditionalGeneration")
class Qwen2_5_VL(Patcher):
    provides = PROVIDES

    def install(self):
        model = self.model
        self.inner = model.model
        self.visual = self.inner.visual
        self.vcfg = self.visual.config
        if self.vcfg.spatial_merge_size != 2:
            raise VlpruneError(f"the qwen2_5_vl patcher expects 2x2 patch merging, got spatial_merge_size="
                               f"{self.vcfg.spatial_merge_size}")
        self.blocks = self.visual.blocks
        method = self.handle.method
        self._busy = False
        self._prompt_len = None
        self._grid_thw = None
        if method.stage == "llm":
            self.llm = LLMPruning(self, self.inner.language_model.layers, method, ragged=True)
        elif method.stage == "in_encoder":
            self.in_encoder = InEncoderPruning(self.inner, method, self.ledger)
        else:
            self.taps = VisionTaps(self.blocks, method.signals(), self.ledger, lambda: self._busy)
        wrap_method(self, model, "forward", self._forward)
        wrap_method(self, model, "generate", self._generate)

    # -- the pruned call --------------------------------------------------------------------------
    def _image_blocks(self, ids, grid_thw, n_patches):
        cfg = self.model.config
        if ids is None:
            raise VlpruneError("the qwen2_5_vl patcher needs input_ids (as the processor returns them) together "
                               "with pixel_values; inputs_embeds-only calls are not supported while patched")
        if grid_thw is None:
            raise VlpruneError("pass image_grid_thw (as the processor returns it) together with pixel_values")
        image_mask = ids == cfg.image_token_id
        thw = grid_thw.tolist()  # host sync: the grids are layout metadata (the unpatched model reads them too)
        sizes = [t * h * w // self.vcfg.spatial_merge_size ** 2 for t, h, w in thw]
        blocks = placeholder_positions(image_mask, sizes)
        described = sum(t * h * w for t, h, w in thw)
        if n_patches is not None and n_patches != described:
            raise VlpruneError(f"image features and placeholders do not match: pixel_values hold {n_patches} "
                               f"patches, image_grid_thw describes {described}")
        rows = block_rows(blocks)
        grids = [(h // 2, w // 2) for _t, h, w in thw]
        if any(t != 1 for t, _h, _w in thw):
            raise VlpruneError("image_grid_thw with t > 1 (several frames per image) is not supported for pruning")
        return image_mask, blocks, rows, sizes, grids

    def _positions(self, kw, generating: bool):
        """(3, B, L) M-RoPE position ids the unpatched model would use for this call (no cache)."""
        ids, mask = kw["input_ids"], kw.get("attention_mask")
        pos = kw.get("position_ids")
        if pos is not None:
            return pos[-3:] if pos.dim() == 3 else pos[None].expand(3, -1, -1)
        if kw.get("mm_token_type_ids") is not None:
            pos, _ = self.inner.get_rope_index(
                ids, kw["mm_token_type_ids"], image_grid_thw=kw.get("image_grid_thw"),
                video_grid_thw=kw.get("video_grid_thw"), second_per_grid_ts=kw.get("second_per_grid_ts"),
                attention_mask=mask)
            return pos
        if generating and mask is not None:  # generate() counts from the mask, the LM's forward 0..L-1
            text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        else:
            text = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        return text[None].expand(3, -1, -1)

    @staticmethod
    def _no_videos(kw):
        if kw.get("pixel_values_videos") is not None:
            raise VlpruneError("videos are not pruned by the qwen2_5_vl patcher; call without pixel_values_videos "
                               "(or remove the patch / use handle.disabled())")

    def _prepare(self, kw: dict, generating: bool):
        """Turn a call with ``pixel_values`` into one on the shortened sequence. Returns (kwargs, dropped)."""
        if kw.get("cache") is not None and kw["cache"].get_seq_length() > 0:
            raise VlpruneError("a pruned call with pixel_values must start from an empty cache")
        pixel_values, grid_thw = kw["pixel_values"], kw.get("image_grid_thw")
        ids = kw.get("input_ids")
        image_mask, blocks, rows, sizes, grids = self._image_blocks(ids, grid_thw, pixel_values.shape[0])
        if self.identity(rows, sizes, ids.device):
            return kw, 0
        ks = [self.keep_count(n) for n in sizes]

        feats, selections = self._encode(pixel_values, grid_thw, sizes, ks, grids)
        keep = keep_mask(image_mask, blocks, [s.indices[0] for s in selections])
        pos = self._positions(kw, generating)  # (3, B, L) original M-RoPE ids
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() == 2:  # the caller's padding goes too; rows are re-padded as needed
            keep &= mask.bool()
        kw = dict(kw)
        for name in ("pixel_values", "image_grid_thw", "position_ids"):
            kw.pop(name, None)
        kw["mm_encoder_outputs"] = {"image": feats}
        length = keep.shape[1]
        cfg = self.model.config
        pad_id = free_pad_id(cfg.text_config.pad_token_id, {cfg.image_token_id, cfg.video_token_id})
        kw, short = shorten(kw, keep, pad_id, extra={"pos": (pos.permute(1, 2, 0), 0)})
        pos = short["pos"].permute(2, 0, 1).contiguous()
        new_mask = kw.get("attention_mask")
        real = new_mask.bool() if new_mask is not None else torch.ones_like(kw["input_ids"], dtype=torch.bool)
        # decoding continues at the original max position + 1: rope_deltas = next position - tokens kept
        top = pos.masked_fill(~real[None], -1).amax(dim=(0, 2))
        self.inner.rope_deltas = (top + 1 - real.long().sum(1)).unsqueeze(1)
        if generating:  # as generate() builds them: a text row (from the mask) over the three M-RoPE rows
            text = (real.long().cumsum(-1) - 1).masked_fill(~real, 0)
            pos = torch.cat([text[None], pos], dim=0)
        kw["position_ids"] = pos
        self.handle.last = [rec for r, n, s in zip(rows, sizes, selections)
                            for rec in self.records([r], n, s.indices.shape[1], s)]
        return kw, length - kw["input_ids"].shape[1]

    def _encode(self, pixel_values, grid_thw, sizes, ks, grids):
        """Vision tower + per-image selection among the merged tokens. Returns (features output, selections)."""
        if self.handle.method.stage == "in_encoder":
            return self.in_encoder.encode(pixel_values, grid_thw, sizes, ks)
        layout = window_layout(grid_thw, self.vcfg)
        self.taps.bounds = [0, *itertools.accumulate(layout["patches"])]
        self._busy = True
        try:
            out = self.inner.get_image_features(pixel_values, grid_thw, return_dict=True)
            raw = self.taps.take()
        finally:
            self._busy = False
            self.taps.bounds = None
            self.taps.take()
        signals = self._raster_signals(raw, layout)
        survivors, selections = [], []
        for i, (feat, n, k) in enumerate(zip(out.pooler_output, sizes, ks)):
            if k >= n:
                survivors.append(feat)
                selections.append(Selection(torch.arange(n, device=feat.device)[None]))
                continue
            kept, sel = self.prune(feat[None], grids[i], {req: v[i] for req, v in signals.items()})
            survivors.append(kept[0])
            selections.append(sel)
        out.pooler_output = tuple(survivors)
        return out, selections

    @staticmethod
    def _raster_signals(raw: dict, layout) -> dict:
        """Per-image (1, ...) signals in raster order of each image's merged grid."""
        edges = [0, *itertools.accumulate(layout["units"])]
        out = {}
        for req, value in raw.items():
            if req.kind in PER_UNIT:
                value = value[:, layout["reverse"]]  # window order -> raster order
                out[req] = [value[:, a:b][None] for a, b in zip(edges[:-1], edges[1:])]
            else:
                out[req] = [value[i][None] for i in range(value.shape[0])]
        return out

    # -- entry points -----------------------------------------------------------------------------
    def _forward(self, original, kw):
        if self.enabled:
            self._no_videos(kw)
        return forward_short(self, original, kw, self._image_count(kw))

    @staticmethod
    def _image_count(kw) -> int:
        if kw.get("pixel_values") is not None:
            return 1
        encoded = (kw.get("mm_encoder_outputs") or {}).get("image")
        return 0 if encoded is None else len(encoded.pooler_output)

    def _forward_llm(self, original, kw):
        """Full sequence in; image tokens leave at decoder layer K (hooks in patches/_llm.py)."""
        ids = kw.get("input_ids")
        grid_thw = kw.get("image_grid_thw", self._grid_thw)
        image_mask, blocks, rows, sizes, grids = self._image_blocks(ids, grid_thw, None)
        images = [LLMImage(r, block, grid, self.keep_count(n)) for r, block, grid, n in zip(rows, blocks, grids, sizes)]
        self.handle.last = [image.untouched() for image in images]  # until a drop
        if all(image.k >= n for image, n in zip(images, sizes)):
            return original(**kw)
        return self.llm.run(original, kw, image_mask, images, self._prompt_len)

    def _generate(self, original, kw):
        if self.enabled:
            self._no_videos(kw)
        if not self.enabled or kw.get("pixel_values") is None:
            return original(**kw)
        if self.handle.method.stage == "llm":
            prompt = kw.get("input_ids", kw.get("inputs"))
            self._prompt_len = None if prompt is None else prompt.shape[1]
            self._grid_thw = kw.get("image_grid_thw")  # generate() encodes the images, then drops the grid
            try:
                return original(**kw)
            finally:
                self._prompt_len = self._grid_thw = None
        return generate_short(original, kw, lambda generate, kw: (generate, *self._prepare(kw, generating=True)))
