"""HF ``Qwen2_5_VLForConditionalGeneration`` (Qwen2.5-VL: windowed ViT without [CLS], 2x2 PatchMerger, M-RoPE).

Where pruning happens. The vision tower runs unchanged on every image (for ``in_encoder`` methods: one image
at a time, on fewer tokens after each prune step). Selection acts on the **merged** tokens the PatchMerger
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

import functools
import itertools

import torch

from vlprune.errors import VlpruneError
from vlprune.builtin_methods.base import Selection
from vlprune.patcher import YES, ImageRecord, Patcher
from vlprune.registry import register_patcher
from vlprune.sequence import (
    block_rows,
    keep_mask,
    placeholder_positions,
)

from ._call import forward_short, free_pad_id, generate_short, shorten
from ._llm import LLMImage, LLMPruning
from ._qwen_vision import PER_UNIT, VisionTaps, window_layout
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
        self._enc = None
        self._prompt_len = None
        self._grid_thw = None
        if method.stage == "llm":
            self.llm = LLMPruning(self, self.inner.language_model.layers, method, ragged=True)
        elif method.stage == "in_encoder":
            self._install_in_encoder(method)
        else:
            self.taps = VisionTaps(self.blocks, method.signals(), self.ledger, lambda: self._busy)
        wrap_method(self, model, "forward", self._forward)
        wrap_method(self, model, "generate", self._generate)

    # -- in-encoder pruning (FlowCut): whole 2x2 units leave between vision blocks ---------------------
    def _install_in_encoder(self, method):
        depth = len(self.blocks)
        self.feature_layer = depth - 1  # the merger reads the last block's output
        self.plan = method.encoder_plan(self.feature_layer)
        if not self.plan or self.plan[-1] >= self.feature_layer or self.plan[0] < 0:
            raise VlpruneError(f"method={method.name!r} planned prune blocks {self.plan}, which must lie in "
                               f"0..{self.feature_layer - 1} (before the last vision block)")
        requests = [s for layer in self.plan for s in method.encoder_signals(layer)]
        self.taps = VisionTaps(self.blocks, requests, self.ledger, lambda: self._busy, global_token=True)
        self.full_blocks = set(self.vcfg.fullatt_block_indexes)
        for idx in range(self.plan[0] + 1, depth):
            hook = functools.partial(self._before_block, idx)
            self.ledger.hook(self.blocks[idx].register_forward_pre_hook(hook, with_kwargs=True))
        self.ledger.hook(self.visual.merger.register_forward_hook(self._after_merger))

    def _before_block(self, idx, _module, args, kwargs):
        state = self._enc
        if not self._busy or state is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if idx - 1 in self.plan:  # prune after block idx - 1
            layer = idx - 1
            keep, state["score"], _ = self.handle.method.encoder_step(
                layer, self.plan[-1] - layer, self._current_signals(), state["score"], state["target"])
            if keep is not None:
                keep = keep[0]
                state["units"] = state["units"][keep]
                hidden = hidden.view(-1, 4, hidden.shape[-1])[keep].reshape(-1, hidden.shape[-1])
        units = state["units"]
        patches = (units[:, None] * 4 + torch.arange(4, device=units.device)).reshape(-1)
        new = dict(kwargs)
        if args:
            args = (hidden, *args[1:])
        else:
            new["hidden_states"] = hidden
        cos, sin = new["position_embeddings"]
        new["position_embeddings"] = (cos[patches], sin[patches])
        if idx in self.full_blocks:
            sizes = torch.tensor([units.numel()], device=units.device)
        else:  # windows keep their surviving units; emptied windows vanish
            sizes = torch.bincount(state["window_of"][units], minlength=state["windows"])
            sizes = sizes[sizes > 0]  # host sync: an emptied window leaves cu_seqlens (its length is a shape)
        cu = torch.nn.functional.pad((sizes * 4).cumsum(0), (1, 0)).to(torch.int32)
        new["cu_seqlens"] = cu
        if new.get("max_seqlen") is not None:
            new["max_seqlen"] = int(sizes.max()) * 4  # host sync: flash attention takes the longest segment
        return args, new

    def _current_signals(self) -> dict:
        """Taps of the current (shortened, window-ordered) sequence of one image, as (1, ...) tensors."""
        out = {}
        for req, value in self.taps.take().items():
            out[req] = value if req.kind not in PER_UNIT else value[None]
        return out

    def _after_merger(self, _module, _args, output):
        state = self._enc
        if not self._busy or state is None:
            return None
        full = output.new_zeros(state["total"], output.shape[-1])  # pruned units stay zero (never read)
        full[state["units"]] = output
        return full

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
        ks = [self.keep_count(n) for n in sizes]
        if all(k >= n for k, n in zip(ks, sizes)):  # the identity: nothing runs differently
            self.handle.last = [ImageRecord(row=r, before=n, after=n, kept=torch.arange(n, device=ids.device))
                                for r, n in zip(rows, sizes)]
            return kw, 0

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
            return self._encode_in_encoder(pixel_values, grid_thw, sizes, ks)
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

    def _encode_in_encoder(self, pixel_values, grid_thw, sizes, ks):
        """One image at a time (adaptive counts would make a batch ragged inside the tower)."""
        chunks = pixel_values.split([t * h * w for t, h, w in grid_thw.tolist()])  # host sync: layout metadata
        outputs, selections = [], []
        for i, (chunk, n, k) in enumerate(zip(chunks, sizes, ks)):
            grid = grid_thw[i : i + 1]
            if k >= n:
                out = self.inner.get_image_features(chunk, grid, return_dict=True)
                outputs.append(out.pooler_output[0])
                selections.append(Selection(torch.arange(n, device=chunk.device)[None]))
                continue
            layout = window_layout(grid, self.vcfg)
            windows = layout["cu_windows"]
            window_of = torch.repeat_interleave(torch.arange(len(windows) - 1, device=windows.device),
                                                windows[1:] - windows[:-1], output_size=n)
            self._enc = {"units": torch.arange(n, device=chunk.device), "score": None, "target": k,
                         "total": n, "window_of": window_of.to(chunk.device), "windows": len(windows) - 1}
            self._busy = True
            try:
                out = self.inner.get_image_features(chunk, grid, return_dict=True)
                units = self._enc["units"]
            finally:
                self._busy, self._enc = False, None
                self.taps.take()
            if units.numel() != k:
                raise RuntimeError(f"{self.handle.method.name} left {units.numel()} units, expected {k}")
            kept = layout["window_index"][units].sort().values  # window order -> raster order
            outputs.append(out.pooler_output[0][kept])
            selections.append(Selection(kept[None]))
        out.pooler_output = tuple(outputs)
        return out, selections

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
