"""HF ``LlavaForConditionalGeneration`` (LLaVA-1.5 layout: CLIP tower, MLP projector, one LM).

How a pruned call runs (``forward`` or ``generate`` with ``pixel_values``):
1. the vision tower runs once, unchanged; q/k hooks compute only the signals the method asked for;
2. a pre-hook on the projector hands the ``vision_feature_layer`` patch features to the method and
   passes only the k survivors on, so the projector runs on k tokens (methods of stage "projector"
   select in a post-hook among the projected features instead; methods of stage "in_encoder" cut
   between encoder layers, the whole batch at once: images that keep different counts are padded to
   the longest, real tokens first, and the padding is masked in attention and in the signals);
3. the LM sequence is rebuilt with k placeholders per image (ids or embeddings, attention mask,
   labels, position ids and every other per-position tensor shortened with one keep mask), and the
   original ``forward``/``generate`` runs on it with the projected survivors as ``mm_encoder_outputs``.
``generate`` then puts the caller's full prompt back in front of the new tokens, so its output
contract (prompt ids + new ids) is unchanged. Nothing is monkeypatched at class level: the wrappers
are instance attributes recorded in the ledger.
"""
from __future__ import annotations

import functools

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlprune.errors import VlpruneError
from vlprune.builtin_methods.base import Selection
from vlprune.patcher import EVERYTHING, ImageRecord, Patcher
from vlprune.registry import register_patcher
from vlprune.select import gather_tokens, grid_shape
from vlprune.sequence import (
    block_rows,
    keep_mask,
    padding_mask,
    placeholder_positions,
    real_tokens,
)

from ._call import free_pad_id, generate_short, shorten
from ._clip import ClipTaps, encoder_layers
from ._contrast import ContrastSession, ContrastTaps, OutlierPrompt, choose_outliers
from ._llm import LLMImage, LLMPruning
from ._wrap import wrap_method

@register_patcher("LlavaForConditionalGeneration")
class LlavaHF(Patcher):
    provides = EVERYTHING  # decoding: contrastive decoding in generate(), see _contrast_session and patches/_contrast.py
    ragged_llm = False  # stage "llm": rows of a batch may keep different counts (see patches/_llm.py)

    def install(self):
        model = self.model
        self.inner = model.model
        tower = self.inner.vision_tower
        self.layers = encoder_layers(tower)  # CLIP/SigLIP encoder.layers, DINOv2 encoder.layer
        vcfg = tower.config
        self.patches_per_image = (vcfg.image_size // vcfg.patch_size) ** 2
        self._busy = False
        self._selection = None
        method = self.handle.method
        projector = self.inner.multi_modal_projector
        self.grid = grid_shape(self.patches_per_image)
        self._prompt_len = None
        self._session = None  # the ContrastSession of a running generate() (damro)
        decoder = self.handle.decoder
        if decoder is not None and decoder.active:  # its own [CLS] taps, live only in its own tower pass
            self.contrast_taps = ContrastTaps(self.layers, decoder, self.ledger)
        if method.stage == "llm":  # the vision side runs unchanged; see patches/_llm.py
            self.llm = LLMPruning(self, self.inner.language_model.layers, method, self.ragged_llm)
            wrap_method(self, model, "forward", self._forward)
            wrap_method(self, model, "generate", self._generate)
            return
        if method.stage == "in_encoder":
            self._install_in_encoder(method)
        else:
            self.taps = ClipTaps(self.layers, method.signals(), self.ledger, lambda: self._busy)
        self._install_selection(method, projector)
        wrap_method(self, model, "forward", self._forward)
        wrap_method(self, model, "generate", self._generate)

    def _install_selection(self, method, projector):
        if method.stage == "projector":  # select among the projected features
            self.ledger.hook(projector.register_forward_hook(self._after_projector))
        else:  # select before the projector: it runs on k tokens only
            self.ledger.hook(projector.register_forward_pre_hook(self._before_projector))

    def _feature_layer_index(self, method) -> int:
        """The encoder layer whose output the projector reads (``hidden_states[i]`` is layer i-1's output)."""
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise VlpruneError(f"method={method.name!r} prunes inside the encoder and needs one vision_feature_layer; "
                               f"this model concatenates layers {layer}")
        return layer % (len(self.layers) + 1) - 1

    def _install_in_encoder(self, method):
        """Prune between encoder layers: a pre-hook on layer l+1 runs the method's step for layer l (its
        signals, tapped during layer l) and applies the cut it decides, if any."""
        self.feature_layer = self._feature_layer_index(method)
        self.plan = method.encoder_plan(self.feature_layer)
        if not self.plan or self.plan[-1] >= self.feature_layer or self.plan[0] < 0:
            raise VlpruneError(f"method={method.name!r} planned prune layers {self.plan}, which must lie in "
                               f"0..{self.feature_layer - 1} (before the feature layer {self.feature_layer})")
        requests = [sig for l in self.plan for sig in method.encoder_signals(l)]
        self.taps = ClipTaps(self.layers, requests, self.ledger, lambda: self._busy, key_mask=self._real_keys)
        for l in self.plan:
            hook = functools.partial(self._between_layers, l)
            self.ledger.hook(self.layers[l + 1].register_forward_pre_hook(hook, with_kwargs=True))

    # -- hooks ------------------------------------------------------------------------------------
    def _between_layers(self, layer, _module, args, kwargs):
        """Before layer ``layer`` + 1: the method's step on ``layer``'s signals, its cut applied to the
        hidden states, and, while a batch's images keep different counts, their padding masked."""
        if not self._busy:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        state = self._enc
        keep, state["score"], counts = self._encoder_step(layer, self.taps.take(), state)
        if keep is not None:  # the real tokens and the mask hiding the padding change only at a cut
            state["orig"], state["counts"] = state["orig"].gather(1, keep), counts
            hidden = torch.cat([hidden[:, :1], gather_tokens(hidden[:, 1:], keep)], dim=1)
            state["real"] = real_tokens(counts, keep.shape[1], hidden.device)
            state["mask"] = padding_mask(state["real"], hidden.dtype)
        mask = state["mask"]
        if keep is None and mask is None:  # the method only updated its running score
            return None
        if len(args) >= 2:  # CLIP / DINOv2 layers take (hidden_states, attention_mask, ...)
            return (hidden, mask if mask is not None else args[1], *args[2:]), kwargs
        kwargs = {**kwargs, **({"attention_mask": mask} if mask is not None else {})}
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _encoder_step(self, layer, signals, state):
        """The method's step after ``layer``: (indices of the current patch tokens to keep or None, new
        score, real tokens per image)."""
        return self.handle.method.encoder_step(layer, self.plan[-1] - layer, signals, state["score"],
                                               state["target"], state["counts"])

    def _real_keys(self):
        """The real tokens ([CLS] included) of the hidden states now entering a layer, or None if unpadded."""
        return self._enc["real"] if self._enc else None

    @staticmethod
    def _encoder_state(n: int, batch: int, k: int, device) -> dict:
        """A call's in-encoder state: each image's surviving patch indices, the method's score, the target,
        the real tokens per image, and, while images keep different counts, which keys are real (with
        [CLS]) and the attention mask that hides the others (None otherwise)."""
        return {"orig": torch.arange(n, device=device).expand(batch, -1), "score": None, "target": k,
                "counts": None, "real": None, "mask": None}

    def _select(self, feats):
        if self.handle.method.stage == "in_encoder":  # already pruned inside the encoder
            k = self._enc["target"]
            if feats.shape[1] != k:
                raise RuntimeError(f"{self.handle.method.name} left {feats.shape[1]} tokens, expected {k}")
            self._selection = Selection(self._enc["orig"])
            return feats
        survivors, self._selection = self.prune(feats, grid_shape(feats.shape[1]), self.taps.take())
        return survivors

    def _before_projector(self, _module, args):
        return (self._select(args[0]),) if self._busy else None

    def _after_projector(self, _module, _args, output):
        return self._select(output) if self._busy else None

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
        k = self.keep_count(n)
        if k >= n:  # the identity: nothing runs differently from the unpatched model
            full = torch.arange(n, device=image_mask.device)
            self.handle.last = [ImageRecord(row=r, before=n, after=n, kept=full) for r in rows]
            return kw, 0

        feats, sel = self._encode(pixel_values, layer, strategy, n, k)
        self.handle.last = self.records(rows, n, k, sel)
        return self._shorten(kw, keep_mask(image_mask, blocks, list(sel.indices)), feats, generating)

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

    def _encode(self, pixel_values, layer, strategy, n, k):
        """Vision tower + selection + projector, on the whole batch (in-encoder methods whose images keep
        different counts pad them inside the tower; see ``_between_layers``)."""
        self._busy = True
        self._enc = self._encoder_state(n, pixel_values.shape[0], k, pixel_values.device)
        try:
            feats = self.inner.get_image_features(pixel_values=pixel_values, vision_feature_layer=layer,
                                                  vision_feature_select_strategy=strategy, return_dict=True)
            return feats, self._selection
        finally:
            self._busy, self._selection, self._enc = False, None, None
            self.taps.take()

    def _forward(self, original, kw):
        if self._session is not None:  # inside generate() under damro: full and outlier rows, contrasted
            return self._session.forward(original, kw)
        if self.enabled and self.handle.method.stage == "llm" and self._image_count(kw):
            return self._forward_llm(original, kw)
        if not self.enabled or kw.get("pixel_values") is None:
            return original(**kw)
        kw, _ = self._prepare(kw, generating=False)
        return original(**kw)

    @staticmethod
    def _image_count(kw) -> int:
        """Images in a call: raw pixels, or features generate() encoded ahead of its prefill."""
        if kw.get("pixel_values") is not None:
            return kw["pixel_values"].shape[0]
        encoded = (kw.get("mm_encoder_outputs") or {}).get("image")
        return 0 if encoded is None else len(encoded.pooler_output)

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
