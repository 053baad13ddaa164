"""The call side shared by HF's LLaVA families (``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``): a CLIP-style tower pruned through ``patches/_tower.py``, an LM
fed ``mm_encoder_outputs``, damro's contrastive ``generate``.

How a pruned call runs (``forward`` or ``generate`` with ``pixel_values``):
1. the family's ``_prepare`` locates the images' placeholders, encodes the images with the method's
   selection (``_tower.py``: taps, projector hooks, in-encoder cuts) and marks the positions that stay;
2. ``_shorten`` rebuilds the LM sequence with one keep mask (ids or embeddings, attention mask, labels,
   position ids and every other per-position tensor), and the original ``forward``/``generate`` runs on
   it with the projected survivors as ``mm_encoder_outputs``;
3. ``generate`` puts the caller's full prompt back in front of the new tokens (``_call.py``), so its
   output contract (prompt ids + new ids) is unchanged.
Stage "llm" leaves the vision side alone: the family's ``_forward_llm`` lays its images out as
``LLMImage``s and ``_llm.py`` drops tokens inside the LM. A family says where things are and nothing
else: ``_prepare``, ``_forward_llm`` and, for damro, ``_outlier_scores`` and ``_image_blocks``. Nothing
is monkeypatched at class level: the wrappers are instance attributes recorded in the ledger.
"""
from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlprune.errors import VlpruneError
from vlprune.patcher import EVERYTHING, Patcher
from vlprune.select import grid_shape
from vlprune.sequence import keep_mask

from ._call import forward_short, free_pad_id, generate_short, shorten
from ._clip import encoder_layers
from ._contrast import ContrastSession, ContrastTaps, OutlierPrompt, choose_outliers
from ._llm import LLMPruning
from ._tower import TowerPruning
from ._wrap import wrap_method


class HFLlava(Patcher):
    """Base of the HF LLaVA families; a subclass implements where its images are (see the module docstring)."""

    provides = EVERYTHING  # decoding: contrastive decoding in generate(), see _contrast_session and patches/_contrast.py
    ragged_llm = False  # stage "llm": rows of a batch may keep different counts (see patches/_llm.py)

    def install(self):
        model = self.model
        self.inner = model.model
        tower = self.inner.vision_tower
        self.layers = encoder_layers(tower)  # CLIP/SigLIP encoder.layers, DINOv2 encoder.layer
        vcfg = tower.config
        self.patches_per_image = (vcfg.image_size // vcfg.patch_size) ** 2
        method = self.handle.method
        self.grid = grid_shape(self.patches_per_image)
        self._prompt_len = None
        self._session = None  # the ContrastSession of a running generate() (damro)
        decoder = self.handle.decoder
        if decoder is not None and decoder.active:  # its own [CLS] taps, live only in its own tower pass
            self.contrast_taps = ContrastTaps(self.layers, decoder, self.ledger)
        if method.stage == "llm":  # the vision side runs unchanged; see patches/_llm.py
            self.llm = LLMPruning(self, self.inner.language_model.layers, method, self.ragged_llm)
        else:
            feature = self._feature_layer_index(method) if method.stage == "in_encoder" else None
            self.tower = TowerPruning(self, self.layers, self._pruned_projector(), feature)
        wrap_method(self, model, "forward", self._forward)
        wrap_method(self, model, "generate", self._generate)

    def _pruned_projector(self):
        """The projector whose hooks select (None: the family runs it itself)."""
        return self.inner.multi_modal_projector

    def _feature_layer_index(self, method) -> int:
        """The encoder layer whose output the projector reads (``hidden_states[i]`` is layer i-1's output)."""
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise VlpruneError(f"method={method.name!r} prunes inside the encoder and needs one vision_feature_layer; "
                               f"this model concatenates layers {layer}")
        return layer % (len(self.layers) + 1) - 1

    # -- the pruned call --------------------------------------------------------------------------
    def _image_mask(self, ids, embeds):
        token = self.model.config.image_token_id
        if ids is not None:
            return ids == token
        ref = self.inner.get_input_embeddings()(torch.tensor(token, device=embeds.device))
        return (embeds == ref).all(-1)

    def _feature_args(self, kw: dict):
        """The call's (vision_feature_layer, vision_feature_select_strategy); only "default" can be pruned."""
        cfg = self.model.config
        layer = kw.get("vision_feature_layer")
        layer = cfg.vision_feature_layer if layer is None else layer
        strategy = kw.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        if strategy != "default":
            raise VlpruneError(
                f"vision_feature_select_strategy={strategy!r} is not supported for pruning (supported: 'default', "
                "which feeds the patch tokens without [CLS])"
            )
        return layer, strategy

    def _shorten(self, kw: dict, keep, feats, generating: bool):
        """The call on the positions ``keep`` (B, L) marks, with ``feats`` as the encoded images: every
        per-position tensor shortened alike, position ids per ``positions``. Returns (kwargs, dropped)."""
        cfg = self.model.config
        kw = dict(kw)
        kw.pop("pixel_values")
        kw["mm_encoder_outputs"] = {"image": feats}
        mask = kw.get("attention_mask")
        pos = kw.get("position_ids")
        if pos is None and self.handle.config.positions == "original":
            # the ids the unpatched model would have used: generate() derives them from the mask,
            # the LM's forward counts 0..L-1
            if generating and mask is not None:
                pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            else:
                pos = torch.arange(keep.shape[1], device=keep.device).expand(keep.shape[0], -1)
        if pos is not None and self.handle.config.positions == "contiguous":
            pos = pos - (~keep).long().cumsum(1)  # close the gaps the dropped tokens leave
        kw["position_ids"] = pos

        kw, _ = shorten(kw, keep, free_pad_id(cfg.text_config.pad_token_id, {cfg.image_token_id}))
        new_len = (kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]).shape[1]
        return kw, keep.shape[1] - new_len

    def _forward(self, original, kw):
        if self._session is not None:  # inside generate() under damro: full and outlier rows, contrasted
            return self._session.forward(original, kw)
        return forward_short(self, original, kw, self._image_count(kw))

    @staticmethod
    def _image_count(kw) -> int:
        """Images in a call: raw pixels, or features generate() encoded ahead of its prefill."""
        if kw.get("pixel_values") is not None:
            return kw["pixel_values"].shape[0]
        encoded = (kw.get("mm_encoder_outputs") or {}).get("image")
        return 0 if encoded is None else len(encoded.pooler_output)

    def _generate(self, original, kw):
        if not self.enabled or kw.get("pixel_values") is None:
            return original(**kw)
        if self.handle.method.stage == "llm":
            prompt = kw.get("input_ids", kw.get("inputs"))
            self._prompt_len = None if prompt is None else prompt.shape[1]
            try:
                return original(**kw)
            finally:
                self._prompt_len = None
        decoder = self.handle.decoder
        if decoder is not None and decoder.active:
            return generate_short(original, kw, self._contrast_session)
        return generate_short(original, kw, lambda generate, kw: (generate, *self._prepare(kw, generating=True)))

    # -- damro: contrastive decoding against the outlier-only prompt ------------------------------
    def _contrast_session(self, original, kw):
        """The call pruned as usual, and ``generate`` wrapped in a :class:`ContrastSession` whose second
        prompt shows each image only through its outlier tokens. Returns (generate, kwargs, dropped)."""
        decoder = self.handle.decoder
        caller = dict(kw)
        if caller.get("input_ids") is None:
            raise VlpruneError(f"method={decoder.name!r} generates from input_ids (inputs_embeds alone is not supported)")
        scores, feats = self._outlier_scores(caller)
        kw, dropped = self._prepare(kw, generating=True)
        if kw.get("pixel_values") is not None:  # nothing pruned: hand generate the features just computed
            kw = {k: v for k, v in kw.items() if k != "pixel_values"}
            kw["mm_encoder_outputs"] = {"image": feats}
        prompt = self._outlier_prompt(caller, scores, feats)
        return ContrastSession(decoder, prompt).around(self, original), kw, dropped

    def _outlier_prompt(self, caller, scores, feats) -> OutlierPrompt:
        """The caller's prompt with each image cut to its outliers (their placeholders and features only,
        in raster order), chosen among the tokens the LM sees (``handle.last`` of the pruned call)."""
        image_mask, blocks, offsets = self._image_blocks(caller)
        chosen = choose_outliers(self.handle.decoder, self.handle.last, scores)
        places = [to_offset(idx.to(image_mask.device)) for to_offset, idx in zip(offsets, chosen)]
        images = [feats.pooler_output[i][at.to(feats.pooler_output[i].device)] for i, at in enumerate(places)]
        caller = {k: v for k, v in caller.items() if k != "image_sizes"}
        short, _ = self._shorten(caller, keep_mask(image_mask, blocks, places),
                                 BaseModelOutputWithPooling(pooler_output=images), generating=True)
        return OutlierPrompt(short["input_ids"], short.get("attention_mask"), short.get("position_ids"),
                             {"mm_encoder_outputs": short["mm_encoder_outputs"]})

    # -- what a family says -----------------------------------------------------------------------
    def _prepare(self, kw: dict, generating: bool):  # pragma: no cover - abstract
        """The call on the shortened sequence (usually via ``_shorten``), ``handle.last`` set. Returns
        (kwargs, positions dropped)."""
        raise NotImplementedError

    def _forward_llm(self, original, kw):  # pragma: no cover - abstract
        """Stage "llm": ``handle.last`` set and ``self.llm.run`` armed with the call's ``LLMImage``s."""
        raise NotImplementedError

    def _outlier_scores(self, kw):  # pragma: no cover - abstract
        """damro: (each image's [CLS] scores over its N visual tokens, ``get_image_features``' output)."""
        raise NotImplementedError

    def _image_blocks(self, kw):  # pragma: no cover - abstract
        """damro: (image mask, each image's placeholder block, each image's map from visual indices to
        offsets in its block and in its ``get_image_features`` output)."""
        raise NotImplementedError
