"""The original LLaVA code (``llava-torch``, ``llava.model.LlavaLlamaForCausalLM``; LLaVA-1.5 checkpoints).

How the original code feeds images: ``input_ids`` hold ONE placeholder (``IMAGE_TOKEN_INDEX = -200``) per
image; ``prepare_inputs_labels_for_multimodal`` encodes the images (``encode_images``: the CLIP tower's
``hidden_states[mm_vision_select_layer]`` without [CLS], then ``mm_projector``), drops each row's padding,
splices every image's features in place of its placeholder, and pads the rows again (on the side
``config.tokenizer_padding_side`` names, right by default) into ``inputs_embeds``, attention mask, labels
and position ids. It inserts whatever number of features an image has, so pruning needs no sequence
surgery of ours: the survivors simply arrive shorter. The pieces, all instance-level and in the ledger:

- stages encoder / projector / in_encoder: the same CLIP q/k/v taps and projector hooks as HF LLaVA-1.5
  (``patches/_tower.py``); a wrapper of ``encode_images`` arms them only inside
  ``prepare_inputs_labels_for_multimodal`` (in_encoder methods run on the batch, padded as there);
- stage llm: the full sequence is built as unpatched; a wrapper of ``prepare_inputs_labels_for_multimodal``
  locates every image's N positions in it and arms ``patches/_llm.py`` for the LM call that follows;
- ``positions="original"``: the same wrapper hands back the position ids the unpatched model would have
  used, gathered at the survivors (the original code otherwise numbers the shortened rows 0..L'-1);
- transformers 5 compatibility: ``generate`` calls ``forward(cache=...)``, while the original ``forward``
  only knows ``past_key_values``; the ``forward`` wrapper renames it (only while patched; the unpatched
  model's ``generate`` fails under transformers 5 as it did before, and its ``forward`` is untouched).
  The original ``forward`` then passes ``past_key_values`` to ``LlamaForCausalLM.forward``, which
  transformers accepts with a deprecation warning until 5.40 (the upper bound of vlprune's pin).

Kept indices are raster indices of the 24 x 24 (generally s x s) patch grid, ascending. ``generate``
keeps the original contract: the original code generates from ``inputs_embeds``, so it returns only the
new tokens, patched or not; an explicit ``max_length`` counts the unpruned sequence, as unpatched.

damro (contrastive decoding, ``patches/_contrast.py``): the original ``generate`` splices the images
into ``inputs_embeds`` and generates from them, so the outlier-only prompt is spliced the same way - the
original ``prepare_inputs_labels_for_multimodal`` run on the caller's ids with each image's features
replaced by its outliers' (``encode_images`` hands them over), so padding side, truncation and labels
follow the original code's rules. Its outliers are chosen once the pruned splice inside ``generate`` has
run (the tokens the LM sees are known only then); the [CLS] rows come from one tower pass of their own
before it, whose features the unpruned splice reuses. Composes with ``prune=`` as on HF LLaVA-1.5.

Supported calls: ``images`` as one (B, 3, H, W) tensor (LLaVA-1.5's ``image_aspect_ratio`` "pad" or
"square"), ``mm_vision_select_feature="patch"``. A prompt without a placeholder consumes one image of
``images`` unused (the original code's rule), so ``handle.last`` has records only for images that reach
the LM. The ``llava`` package is imported only when such a model is patched.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect

import torch

from vlprune.errors import VlpruneError
from vlprune.builtin_methods.base import Selection
from vlprune.patcher import EVERYTHING, Patcher
from vlprune.registry import register_patcher
from vlprune.select import grid_shape

from ._clip import encoder_layers
from ._contrast import ContrastSession, ContrastTaps, OutlierPrompt, choose_outliers
from ._llm import LLMImage, LLMPruning
from ._tower import TowerPruning
from ._splice import Splice
from ._wrap import named_arguments, wrap_method

@register_patcher("LlavaLlamaForCausalLM")
class LlavaOriginal(Patcher):
    provides = EVERYTHING  # as HF LLaVA-1.5: the same CLIP tower, projector position and a Llama LM

    def install(self):
        from llava.constants import IMAGE_TOKEN_INDEX  # the model exists, so llava is installed

        self.image_token = IMAGE_TOKEN_INDEX
        model = self.model
        self.inner = model.get_model()
        tower = self.inner.get_vision_tower()
        if tower is None or not getattr(tower, "is_loaded", False):
            raise VlpruneError(
                "this LlavaLlamaForCausalLM has no loaded vision tower; load it with "
                "llava.model.builder.load_pretrained_model (or call model.get_vision_tower().load_model())")
        if tower.select_feature != "patch":
            raise VlpruneError(f"mm_vision_select_feature={tower.select_feature!r} is not supported for pruning "
                               "(supported: 'patch', which feeds the patch tokens without [CLS])")
        self.layers = encoder_layers(tower.vision_tower)
        self.select_layer = tower.select_layer
        self.patches_per_image = tower.num_patches
        self.grid = grid_shape(self.patches_per_image)
        self.splice = Splice(self.image_token, self.patches_per_image, model.config)
        self._in_prepare = self._generating = False
        self._selections = self._labels = None
        self._prompt_len = None
        self._session = None  # the ContrastSession of a running generate() (damro)
        self._features = None  # image features encode_images hands out instead of encoding (damro)
        self._splice_images = model.prepare_inputs_labels_for_multimodal  # the original, for damro's outlier prompt
        decoder = self.handle.decoder
        if decoder is not None and decoder.active:  # its own [CLS] taps, live only in its own tower pass
            self.contrast_taps = ContrastTaps(self.layers, decoder, self.ledger)
        method = self.handle.method
        if method.stage == "llm":
            self.llm = LLMPruning(self, self.inner.layers, method)
        else:
            feature = self.select_layer % (len(self.layers) + 1) - 1  # the layer whose output the projector reads
            self.tower = TowerPruning(self, self.layers, self.inner.mm_projector, feature)
            wrap_method(self, model, "encode_images", self._encode_images)
        wrap_method(self, model, "prepare_inputs_labels_for_multimodal", self._prepare_mm)
        self._wrap_forward()
        wrap_method(self, model, "generate", self._generate)

    def _wrap_forward(self):
        """``forward`` as an instance attribute; transformers 5's ``cache`` keyword is renamed before the
        call is bound to the original signature (which has ``past_key_values`` and no ``**kwargs``)."""
        original = self.model.forward
        signature = inspect.signature(original)

        @functools.wraps(original)  # generate() inspects the signature (position_ids etc.)
        def forward(*args, **kwargs):
            if "cache" in kwargs:
                cache = kwargs.pop("cache")
                if kwargs.get("past_key_values") is None:
                    kwargs["past_key_values"] = cache
            return self._forward(original, named_arguments(signature, args, kwargs))

        self.ledger.set_attr(self.model, "forward", forward)

    # -- the wrappers -------------------------------------------------------------------------------
    def _prepare_mm(self, original, kw):
        ids, images = kw.get("input_ids"), kw.get("images")
        if not self.enabled or images is None or ids is None or ids.shape[1] == 1:
            return original(**kw)
        _check_images(images)
        mask = kw.get("attention_mask")
        needed = self.splice.images_needed(ids, mask)
        if images.shape[0] != needed:
            raise VlpruneError(
                f"images holds {images.shape[0]} images; the prompts need {needed} (one per IMAGE_TOKEN_INDEX "
                "placeholder, and the original code consumes one for every prompt without a placeholder)")
        n, k = self.patches_per_image, self.keep_count(self.patches_per_image)
        full = [torch.arange(n, device=ids.device)] * needed
        if k >= n:  # the identity: the unpatched call, each image that reaches the LM recorded whole
            reaching = [r for r, row in enumerate(self.splice.rows(ids, mask, full)) for _ in row.images]
            self.identity(reaching, [n] * len(reaching), ids.device)
            return original(**kw)
        if self.handle.method.stage == "llm":
            return self._prepare_llm(original, kw, full, n, k)
        self._in_prepare, self._selections = True, []
        try:
            out = original(**kw)
            selections = self._selections
        finally:
            self._in_prepare, self._selections = False, None
        sel = Selection(torch.cat([s.indices for s in selections]),
                        *[None if any(getattr(s, f) is None for s in selections) else
                          torch.cat([getattr(s, f) for s in selections]) for f in ("scores", "tokens", "sources")])
        rows = self.splice.rows(ids, mask, list(sel.indices))
        records = self.records([0] * needed, n, k, sel)  # rows filled in below
        self.handle.last = [dataclasses.replace(records[i], row=r) for r, row in enumerate(rows) for i, _, _ in row.images]
        if self.handle.config.positions == "original":
            _, pos, attn, past, embeds, labels = out
            pos = self.splice.position_ids(rows, embeds.shape[1], kw.get("position_ids"), self._generating, embeds.device)
            out = (None, pos, attn, past, embeds, labels)
        return out

    def _prepare_llm(self, original, kw, full, n, k):
        """Unpatched splice; then arm the drop at decoder layer K for the LM call that follows."""
        ids, mask = kw["input_ids"], kw.get("attention_mask")
        out = original(**kw)
        _, pos, attn, past, embeds, labels = out
        rows = self.splice.rows(ids, mask, full)
        b, length = embeds.shape[:2]
        image_mask = torch.zeros(b, length, dtype=torch.bool, device=embeds.device)
        images = []
        for r, (row, start) in enumerate(zip(rows, self.splice.place(rows, length))):
            for _, first, count in row.images:
                if count != n:
                    raise VlpruneError(f"an image was cut to {count} of {n} tokens by tokenizer_model_max_length; "
                                       f"method={self.handle.method.name!r} needs whole images")
                cols = torch.arange(start + first, start + first + n, device=embeds.device)
                image_mask[r, cols] = True
                images.append(LLMImage(r, torch.stack([torch.full_like(cols, r), cols], 1), self.grid, k))
        self.handle.last = [image.untouched() for image in images]  # until a drop
        if not images:
            return out
        if attn is not None and not self.splice.left_padded:
            anchor = attn.long().sum(1) - 1  # the prompt's last token
        else:
            anchor = torch.full((b,), length - 1, device=embeds.device)
        self.llm.begin(image_mask, images, anchor)
        self._labels = labels
        return None, pos, attn, past, embeds, None  # the loss is taken after the drop (in _forward)

    def _encode_images(self, original, kw):
        """Inside a pruned splice: arm the taps and hooks for the batch of images. Features handed over by
        damro (``self._features``) are returned instead, once."""
        features, self._features = self._features, None
        if features is not None:
            return features
        if not self._in_prepare:
            return original(**kw)
        images, n = kw["images"], self.patches_per_image
        with self.tower.encoding(n, images.shape[0], self.keep_count(n), images.device) as call:
            feats = original(images=images)
            self._selections.append(call.selection)
            return feats

    def _forward(self, original, kw):
        if self._session is not None:  # inside generate() under damro: full and outlier rows, contrasted
            return self._session.forward(original, kw)
        try:
            out = original(**kw)
            pending = getattr(self, "llm", None) is not None and self.llm.pending is not None
            if pending:
                cols, filler = self.llm.pending["cols"], self.llm.pending.get("filler")
        finally:
            if getattr(self, "llm", None) is not None:
                self.llm.end()
            labels, self._labels = self._labels, None
        if pending and labels is not None:  # the loss over the positions that reached the head
            if cols is not None:
                labels = labels.gather(1, cols) if filler is None else labels.gather(1, cols).masked_fill(filler, -100)
            out.loss = self.model.loss_function(logits=out.logits, labels=labels, vocab_size=self.model.config.vocab_size)
        return out

    def _generate(self, original, kw):
        if not self.enabled or kw.get("images") is None:
            return original(**kw)
        ids = kw.get("inputs")
        if kw.get("max_length") is not None and kw.get("max_new_tokens") is None and ids is not None:
            kw["max_length"] -= self._dropped(ids, kw.get("attention_mask"))
        decoder = self.handle.decoder
        if decoder is not None and decoder.active:
            original = self._contrast_session(original, kw)
        self._generating = True
        try:
            return original(**kw)
        finally:
            self._generating = False
            self._features = None
            if getattr(self, "llm", None) is not None:
                self.llm.end()

    # -- damro: contrastive decoding against the outlier-only prompt ------------------------------
    def _contrast_session(self, original, kw):
        """``generate`` wrapped in a :class:`ContrastSession` whose outlier prompt is spliced at its first
        forward call, once the pruned splice has recorded which tokens the LM sees."""
        ids, images = kw.get("inputs"), kw["images"]
        if ids is None:
            raise VlpruneError(f"method={self.handle.decoder.name!r} generates from input ids (inputs)")
        _check_images(images)
        feats, scores = self.contrast_taps.capture(lambda: self.inner.mm_projector(self.inner.get_vision_tower()(images)))
        n = self.patches_per_image
        if self.keep_count(n) >= n:  # nothing pruned: the full splice takes the features just computed
            self._features = feats
        build = functools.partial(self._outlier_prompt, ids, kw.get("attention_mask"), kw.get("position_ids"),
                                  images, scores, feats)
        return ContrastSession(self.handle.decoder, build, cache_key="past_key_values").around(self, original)

    def _outlier_prompt(self, ids, mask, position_ids, images, scores, feats) -> OutlierPrompt:
        """The caller's prompt spliced by the original code with each image as its outliers only."""
        n = self.patches_per_image
        full = [torch.arange(n, device=ids.device)] * images.shape[0]
        used = [i for row in self.splice.rows(ids, mask, full) for i, _, _ in row.images]  # images reaching the LM
        chosen = choose_outliers(self.handle.decoder, self.handle.last, scores[used])
        outliers = list(full)
        for i, idx in zip(used, chosen):
            outliers[i] = idx.to(ids.device)
        self._features = [f[idx.to(f.device)] for f, idx in zip(feats, outliers)]
        try:
            _, pos, attn, _, embeds, _ = self._splice_images(
                ids, position_ids, mask if mask is not None else torch.ones_like(ids), None, None, images)
        finally:
            self._features = None
        if self.handle.config.positions == "original":
            pos = self.splice.position_ids(self.splice.rows(ids, mask, outliers), embeds.shape[1], position_ids,
                                           self._generating, embeds.device)
        return OutlierPrompt(None, attn, pos, inputs_embeds=embeds)

    def _dropped(self, ids, mask) -> int:
        """How much shorter the spliced batch gets: an explicit max_length counts the unpruned one."""
        n, k = self.patches_per_image, self.keep_count(self.patches_per_image)
        needed = self.splice.images_needed(ids, mask)
        if k >= n or self.handle.method.stage == "llm":  # the LM input keeps every position
            return 0
        short = self.splice.rows(ids, mask, [torch.arange(k, device=ids.device)] * needed)
        return max(row.full for row in short) - max(row.orig.shape[0] for row in short)


def _check_images(images):
    if not torch.is_tensor(images) or images.dim() != 4:
        raise VlpruneError("the llava_original patcher supports images as one (B, 3, H, W) tensor (LLaVA-1.5, "
                           "image_aspect_ratio 'pad' or 'square'); got a list or 5-D images (AnyRes)")
