"""Signal taps on HF Qwen2.5-VL's vision tower (windowed ViT, no [CLS], 2x2 units the PatchMerger merges),
as ``_clip.py`` is for CLIP towers.

Signals (per vision block, from the block's q/k/v, q and k after the vision rotary embedding):

- ``attention_received`` (1, heads, n): column mean of the attention the block really computes, over all
  the image's queries, computed segment by segment in query chunks (never N x N): in full-attention blocks
  the segment is the image, in windowed blocks each window - a key gets nothing from queries outside its
  window, which is what the model does (the alternative, full attention in windowed blocks as the HiPrune
  Qwen code recomputes it, describes an attention the model never runs). Every key's expected value is
  1 / (image patches) either way, so windows of any size compare fairly. Then averaged over each 2x2 unit.
- ``keys`` / ``values`` (1, heads, n, head_dim): the mean of the unit's 4 patch keys (after rotary, as the
  attention saw them) / values.
- No [CLS] token exists; methods that ask for one get a documented substitute (see ``PROVIDES``):
  ``cls_attention`` is the mean attention received above (HoloV's and HiPrune's Qwen choice), except for
  stage ``in_encoder`` (``flowcut``), which gets the attention row of a **global token** - the mean of the image's patch queries
  (FlowCut's Qwen choice): softmax(q_mean . K^T * scale) over the image's patches (the whole image, also in
  windowed blocks: the token is virtual), averaged per unit. ``cls_query`` / ``cls_key`` / ``cls_value``
  are that global token's query / key / value: the mean of the image's patch queries / keys / values.
"""
from __future__ import annotations

import functools
import itertools
import sys

import torch

from vlprune import signals as sig
from vlprune.builtin_methods.base import Selection, Signal
from vlprune.errors import VlpruneError

from ._clip import resolve_layer

KINDS = ("attention_received", "cls_attention", "keys", "values", "cls_query", "cls_key", "cls_value")
PER_UNIT = ("attention_received", "cls_attention", "keys", "values")


def window_layout(grid_thw: torch.Tensor, vcfg) -> dict:
    """Where each image's 2x2 units sit in the tower's window-permuted sequence.

    ``window_index[j]`` is the raster unit (over all images, in order) at permuted unit position j;
    ``reverse`` = argsort(window_index) maps permuted -> raster (``raster = permuted[reverse]``);
    ``cu_windows`` are the window boundaries in units. Images stay contiguous and in order.
    """
    from transformers.vision_utils import get_vision_window_index  # generic transformers helper

    window_index, cu_window = get_vision_window_index(
        grid_thw, spatial_merge_size=vcfg.spatial_merge_size, window_size=vcfg.window_size,
        patch_size=vcfg.patch_size)
    unit = vcfg.spatial_merge_size ** 2
    patches = [t * h * w for t, h, w in grid_thw.tolist()]  # host sync: layout metadata, as above
    window_index = window_index.to(grid_thw.device)
    return {"window_index": window_index, "reverse": window_index.argsort(), "cu_windows": cu_window.long() // unit,
            "patches": patches, "units": [p // unit for p in patches], "unit": unit}


class VisionTaps:
    """Signal taps on Qwen2.5-VL vision blocks: a pre-hook on ``attn`` keeps the block's ``cu_seqlens`` and
    rotary tables, a hook on ``attn.qkv`` computes the requested signals from q/k/v (SDPA/flash stay on).

    Results stay in the tower's current (window-permuted) unit order: per-unit kinds (heads, U[, d]),
    global-token kinds (images, heads, d). ``bounds`` (patch offsets of the images in the sequence; None:
    one image) says which patches form an image.
    """

    def __init__(self, blocks, requests: list[Signal], ledger, enabled, global_token: bool = False):
        self.values: dict[Signal, torch.Tensor] = {}
        self.bounds = None
        self._enabled = enabled
        self._global = global_token
        self._pending = {}
        by_block: dict[int, list[Signal]] = {}
        for req in requests:
            if req.kind not in KINDS:
                raise VlpruneError(f"signal kind {req.kind!r} is not available on Qwen2.5-VL vision blocks "
                                   f"(available: {', '.join(KINDS)})")
            by_block.setdefault(resolve_layer(req.layer, len(blocks), "vision block"), []).append(req)
        self.rope = sys.modules[type(blocks[0].attn).__module__].apply_rotary_pos_emb_vision
        for idx, reqs in by_block.items():
            attn = blocks[idx].attn
            ledger.hook(attn.register_forward_pre_hook(functools.partial(self._grab, idx), with_kwargs=True))
            ledger.hook(attn.qkv.register_forward_hook(functools.partial(self._on_qkv, idx, attn, reqs)))

    def _grab(self, idx, _module, args, kwargs):
        if self._enabled():
            self._pending[idx] = (kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1],
                                  kwargs.get("position_embeddings"))

    def _on_qkv(self, idx, attn, reqs, _module, _inputs, output):
        if not self._enabled() or idx not in self._pending:
            return
        cu, (cos, sin) = self._pending.pop(idx)
        s = output.shape[0]
        q, k, v = output.reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (S, H, d) each
        q, k = self.rope(q, k, cos, sin)  # exactly what the attention sees
        bounds = self.bounds if self.bounds is not None else [0, s]
        images = list(zip(bounds[:-1], bounds[1:]))
        cache = {}
        for req in reqs:
            self.values[req] = self._signal(req.kind, q, k, v, cu, images, attn.scaling, cache)

    def _signal(self, kind, q, k, v, cu, images, scale, cache):
        if kind == "cls_attention" and not self._global:
            kind = "attention_received"
        if kind in cache:
            return cache[kind]
        heads = q.shape[1]
        if kind == "attention_received":
            received = torch.zeros(heads, q.shape[0], dtype=torch.float32, device=q.device)
            edges = cu.tolist()  # host sync: the block's segments (images or windows) bound its attention
            for start, end in zip(edges[:-1], edges[1:]):  # the block's own segments: image or window
                if end > start:
                    qs, ks = q[start:end].transpose(0, 1)[None], k[start:end].transpose(0, 1)[None]
                    received[:, start:end] = sig.attention_received(qs, ks, scale)[0] * (end - start)
            for start, end in images:  # mean over all the image's queries
                received[:, start:end] /= end - start
            out = _units(received)
        elif kind == "cls_attention":  # the global token's row over its image's patches
            rows = [sig.cls_attention(q[a:b].float().mean(0)[None, :, None], k[a:b].transpose(0, 1)[None], scale)[0]
                    for a, b in images]
            out = _units(torch.cat(rows, dim=-1))
        elif kind in ("keys", "values"):
            t = (k if kind == "keys" else v).float()
            out = t.view(-1, 4, heads, t.shape[-1]).mean(1).transpose(0, 1)  # (H, U, d)
        else:  # cls_query / cls_key / cls_value: the image's mean
            t = {"cls_query": q, "cls_key": k, "cls_value": v}[kind].float()
            out = torch.stack([t[a:b].mean(0) for a, b in images])  # (images, H, d)
        cache[kind] = out
        return out

    def take(self) -> dict:
        values, self.values = self.values, {}
        self._pending.clear()
        return values


def _units(per_patch: torch.Tensor) -> torch.Tensor:
    """(H, S) per patch -> (H, S / 4) mean over each 2x2 unit (4 consecutive patches in the tower's order)."""
    return per_patch.view(per_patch.shape[0], -1, 4).mean(-1)


class InEncoderPruning:
    """Stage ``in_encoder`` (FlowCut) on Qwen2.5-VL's tower, every image of a call in one pass: whole 2x2
    units leave between vision blocks, each image at its own count (the method sees the images' units
    padded to the longest, real first); the rotary tables, the windows and the full-attention segments
    (``cu_seqlens``) shrink with them and emptied windows vanish; the merger's output is scattered back
    to the full unit count (pruned units stay zero, never read)."""

    def __init__(self, inner, method, ledger):
        self.inner, self.method = inner, method
        self.visual = inner.visual
        self.vcfg, self.blocks = self.visual.config, self.visual.blocks
        self._enc = None  # the call being encoded: surviving units, counts, scores, targets, windows
        depth = len(self.blocks)
        self.feature_layer = depth - 1  # the merger reads the last block's output
        self.plan = method.encoder_plan(self.feature_layer)
        if not self.plan or self.plan[-1] >= self.feature_layer or self.plan[0] < 0:
            raise VlpruneError(f"method={method.name!r} planned prune blocks {self.plan}, which must lie in "
                               f"0..{self.feature_layer - 1} (before the last vision block)")
        requests = [s for layer in self.plan for s in method.encoder_signals(layer)]
        self.taps = VisionTaps(self.blocks, requests, ledger, lambda: self._enc is not None, global_token=True)
        self.full_blocks = set(self.vcfg.fullatt_block_indexes)
        for idx in range(self.plan[0] + 1, depth):
            hook = functools.partial(self._before_block, idx)
            ledger.hook(self.blocks[idx].register_forward_pre_hook(hook, with_kwargs=True))
        ledger.hook(self.visual.merger.register_forward_hook(self._after_merger))

    def _before_block(self, idx, _module, args, kwargs):
        state = self._enc
        if state is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if idx - 1 in self.plan:  # prune after block idx - 1
            layer = idx - 1
            counts = state["counts"]
            keep, state["score"], new = self.method.encoder_step(
                layer, self.plan[-1] - layer, self._padded_signals(counts), state["score"], state["target"], counts)
            if keep is not None:  # each image's first new[i] positions, back to the packed sequence
                starts = [0, *itertools.accumulate(counts)]
                flat = torch.cat([keep[i, :c] + starts[i] for i, c in enumerate(new)])
                state["units"], state["counts"] = state["units"][flat], new
                hidden = hidden.view(-1, 4, hidden.shape[-1])[flat].reshape(-1, hidden.shape[-1])
                self.taps.bounds = [0, *itertools.accumulate(4 * c for c in new)]
        units = state["units"]
        patches = (units[:, None] * 4 + torch.arange(4, device=units.device)).reshape(-1)
        new_kw = dict(kwargs)
        if args:
            args = (hidden, *args[1:])
        else:
            new_kw["hidden_states"] = hidden
        cos, sin = new_kw["position_embeddings"]
        new_kw["position_embeddings"] = (cos[patches], sin[patches])
        if idx in self.full_blocks:  # one segment per image
            sizes = torch.tensor(state["counts"], device=units.device)
        else:  # windows keep their surviving units; emptied windows vanish
            sizes = torch.bincount(state["window_of"][units], minlength=state["windows"])
            sizes = sizes[sizes > 0]  # host sync: an emptied window leaves cu_seqlens (its length is a shape)
        new_kw["cu_seqlens"] = torch.nn.functional.pad((sizes * 4).cumsum(0), (1, 0)).to(torch.int32)
        if new_kw.get("max_seqlen") is not None:
            new_kw["max_seqlen"] = int(sizes.max()) * 4  # host sync: flash attention takes the longest segment
        return args, new_kw

    def _padded_signals(self, counts: list[int]) -> dict:
        """The taps of the current (shortened, window-ordered) packed sequence as the method reads a batch:
        per-unit kinds (images, heads, longest count[, d]), each image's units first, zeros after."""
        out = {}
        for req, value in self.taps.take().items():
            if req.kind not in PER_UNIT:  # the global token's: (images, heads, d) already
                out[req] = value
                continue
            padded = value.new_zeros(len(counts), value.shape[0], max(counts), *value.shape[2:])
            for i, (start, c) in enumerate(zip(itertools.accumulate([0, *counts]), counts)):
                padded[i, :, :c] = value[:, start : start + c]
            out[req] = padded
        return out

    def _after_merger(self, _module, _args, output):
        state = self._enc
        if state is None:
            return None
        full = output.new_zeros(state["total"], output.shape[-1])  # pruned units stay zero (never read)
        full[state["units"]] = output
        return full

    def encode(self, pixel_values, grid_thw, sizes, ks):
        """(features output, selections): the tower once over every image, ``min(ks[i], sizes[i])`` units of
        image i surviving."""
        layout = window_layout(grid_thw, self.vcfg)
        windows = layout["cu_windows"]
        total, device = sum(sizes), pixel_values.device
        window_of = torch.repeat_interleave(torch.arange(len(windows) - 1, device=windows.device),
                                            windows[1:] - windows[:-1], output_size=total)
        targets = [min(k, n) for k, n in zip(ks, sizes)]
        self._enc = {"units": torch.arange(total, device=device), "score": None, "target": targets,
                     "counts": list(sizes), "total": total, "window_of": window_of.to(device),
                     "windows": len(windows) - 1}
        self.taps.bounds = [0, *itertools.accumulate(layout["patches"])]
        try:
            out = self.inner.get_image_features(pixel_values, grid_thw, return_dict=True)
            units, counts = self._enc["units"], self._enc["counts"]
        finally:
            self._enc, self.taps.bounds = None, None
            self.taps.take()
        if counts != targets:
            raise RuntimeError(f"{self.method.name} left {counts} units per image, expected {targets}")
        outputs, selections = [], []
        starts, offsets = itertools.accumulate([0, *counts]), itertools.accumulate([0, *sizes])
        for feats, start, offset, c in zip(out.pooler_output, starts, offsets, counts):
            kept = (layout["window_index"][units[start : start + c]] - offset).sort().values  # -> raster
            outputs.append(feats[kept])
            selections.append(Selection(kept[None]))
        out.pooler_output = tuple(outputs)
        return out, selections
