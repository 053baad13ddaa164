"""HF ``LlavaForConditionalGeneration`` (LLaVA-1.5 layout: CLIP tower, MLP projector, one LM).

Every image is N = s x s placeholders in the prompt, fed as the ``vision_feature_layer`` patch tokens
without [CLS]. Pruned, it keeps k of them: the whole batch goes through the tower at once, the method
selects in the projector's hooks (``patches/_tower.py``), and k placeholders per image stay, in raster
order. The call side (shortening, generate, damro) is ``patches/_hf_llava.py``.
"""
from __future__ import annotations


from vlprune.errors import VlpruneError
from vlprune.registry import register_patcher
from vlprune.sequence import block_rows, keep_mask, placeholder_positions

from ._hf_llava import HFLlava
from ._llm import LLMImage


@register_patcher("LlavaForConditionalGeneration")
class LlavaHF(HFLlava):
    def _prepare(self, kw: dict, generating: bool):
        """Turn a call with ``pixel_values`` into one on the shortened sequence. Returns (kwargs, dropped)."""
        pixel_values = kw["pixel_values"]
        if kw.get("image_sizes") is not None:
            raise VlpruneError("image_sizes is not used by LLaVA-1.5 models and is not supported by the llava_hf patcher")
        layer, strategy = self._feature_args(kw)
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if ids is None and embeds is None:
            raise VlpruneError("pass input_ids or inputs_embeds together with pixel_values")
        image_mask = self._image_mask(ids, embeds)
        n = self.patches_per_image
        blocks = placeholder_positions(image_mask, n)
        if len(blocks) != pixel_values.shape[0]:
            raise VlpruneError(
                f"image features and placeholders do not match: {pixel_values.shape[0]} images in pixel_values, "
                f"placeholders for {len(blocks)} images of {n} tokens each in the prompt"
            )
        rows = block_rows(blocks)
        if self.identity(rows, [n] * len(rows), image_mask.device):
            return kw, 0
        k = self.keep_count(n)

        feats, sel = self._encode(pixel_values, layer, strategy, n, k)
        self.handle.last = self.records(rows, n, k, sel)
        return self._shorten(kw, keep_mask(image_mask, blocks, list(sel.indices)), feats, generating)

    def _encode(self, pixel_values, layer, strategy, n, k):
        """Vision tower + selection + projector, on the whole batch (patches/_tower.py)."""
        with self.tower.encoding(n, pixel_values.shape[0], k, pixel_values.device) as call:
            feats = self.inner.get_image_features(pixel_values=pixel_values, vision_feature_layer=layer,
                                                  vision_feature_select_strategy=strategy, return_dict=True)
            return feats, call.selection

    def _forward_llm(self, original, kw):
        """Full sequence in; image tokens leave at decoder layer K (hooks in patches/_llm.py)."""
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if ids is None and embeds is None:
            raise VlpruneError("pass input_ids or inputs_embeds together with pixel_values")
        image_mask = self._image_mask(ids, embeds)
        n = self.patches_per_image
        blocks = placeholder_positions(image_mask, n)
        if len(blocks) != self._image_count(kw):
            raise VlpruneError(
                f"image features and placeholders do not match: {self._image_count(kw)} images given, "
                f"placeholders for {len(blocks)} images of {n} tokens each in the prompt")
        k = self.keep_count(n)
        images = [LLMImage(r, block, self.grid, k) for r, block in zip(block_rows(blocks), blocks)]
        self.handle.last = [image.untouched() for image in images]  # until a drop
        if k >= n:
            return original(**kw)
        return self.llm.run(original, kw, image_mask, images, self._prompt_len)

    def _outlier_scores(self, kw):
        """One tower pass with the decoder's taps: (each image's head-mean [CLS] row over its N visual
        tokens, the projected features as ``get_image_features`` returns them)."""
        layer, strategy = self._feature_args(kw)
        feats, scores = self.contrast_taps.capture(lambda: self.inner.get_image_features(
            pixel_values=kw["pixel_values"], vision_feature_layer=layer, vision_feature_select_strategy=strategy,
            return_dict=True))
        return scores, feats

    def _image_blocks(self, kw):
        """(image mask, each image's placeholder block, each image's map from visual token indices to
        offsets in its block and in its ``get_image_features`` output) of the caller's prompt."""
        image_mask = self._image_mask(kw["input_ids"], None)
        blocks = placeholder_positions(image_mask, self.patches_per_image)
        return image_mask, blocks, [lambda idx: idx] * len(blocks)
