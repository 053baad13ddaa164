"""HF ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT AnyRes: base view + crops, unpadded, newline per row).

The unpruned model feeds each image as: the base view's s x s patch tokens (raster order), then the
crops stitched into one high-res grid, its padding rows or columns removed ("unpadded", H x W left),
each of its H rows followed by an ``image_newline`` token. Everything else works as on LLaVA-1.5
(the shared HF LLaVA call side, patches/_hf_llava.py): q/k/v taps for the signals, the sequence rebuilt
with one keep mask, ``generate`` returning the caller's prompt ids + new ids.

Budget, per image. ``ratio``/``keep`` count the image's visual tokens as the unpruned model feeds them,
newlines excluded: N = s*s + H*W. The image's k is split over its views (the base view and every crop)
in proportion to the tokens each contributes after unpadding (largest remainder, ties to the earlier
view). Where nothing is unpadded every view holds s*s tokens, and this is the references' equal quota per
crop (FasterVLM, HiPrune); a crop that lost rows to unpadding gives up budget in proportion, so exactly k
tokens arrive. Each view is pruned by the method on its own 2-D grid (a crop: the rectangle unpadding
leaves of it) with that view's own signals (its own [CLS]), so grid-aware methods see real geometry. Not
one global pass (HoloV's reference): [CLS] attention is normalised per view, so scores of different
views are not on one scale, and the views do not form one grid.

Newlines. A newline closes every high-res row that keeps at least one token; a row left empty vanishes
with its newline. The LM thus gets the layout it was trained on (base tokens, then high-res rows each
ended by a newline), only sparser; the references drop every newline instead. They are not counted in
the budget: ``handle.last[i].newlines`` says how many reached the LM.

``handle.last`` holds one :class:`NextImageRecord` per image: ``before``/``after`` count visual tokens;
``kept`` indexes them (i < s*s: the base view's raster; i >= s*s: raster index i - s*s of the unpadded
high-res grid, (row, col) = divmod(i - s*s, W)), ascending, which is the order the LM receives them in;
``scores`` (N,) where the method has them (NaN for a view that got no budget); merge ``sources`` (k, N).

Stage "llm" (FastV, visual_exit): the full NeXT sequence enters the LM; at decoder layer K the method
picks k of the image's N visual tokens in one pass (the LM's attention row is one softmax over the whole
sequence, so views compare), the same newline rule applies, and batch rows that keep different counts
are evened out with masked fillers (patches/_llm.py).

Method support (``LlavaNextHF.provides``; the model x method table of docs/models.md is derived from it):

| method | on LLaVA-NeXT |
|---|---|
| divprune, holov (stage projector) | yes: per view, on the projected tokens |
| fastervlm, hiprune, pool, prumerge_plus, random, tcc, uniform, visionzip, vtc_cls (stage encoder) | yes: per view |
| flowcut (stage in_encoder) | yes: every view of the batch in one tower pass, each to its own quota; its first prune picks among the unpadded tokens only |
| fastv, visual_exit (stage llm) | yes: one pass over the image's visual tokens at layer K |
| damro (decoding) | substitute: outliers global over the image's views, outlier-only prompt without newlines; composes with every ``prune=`` pruning method |

damro (contrastive decoding, ``patches/_contrast.py``). Outliers: the image's ``outliers`` tokens with the
highest [CLS] attention over *all* its views at once - each token scored by its own view's head-mean
[CLS] row (the base view's, or its crop's), only tokens that reach the LM competing (unpadded ones,
and with ``prune=`` the kept ones). One ranking across views is sound here, unlike for pruning scores
in general: every view's [CLS] spreads its attention over the same s*s patches, so a share means the
same in every view, and an outlier is a token taking a large share. Not the base view only: the LM
sees every crop's outliers too (DAMRO's point is what the LM attends to), and a pruned base view may
keep few tokens. Outlier-only prompt: per image, its outlier tokens' projected features in the image's
visual order (base view first, then high-res raster order), one placeholder each, and no newline
tokens - the contrast shows the outliers alone, as on LLaVA-1.5, not a sparse grid whose newlines
would add content-free tokens that depend on where the outliers fall. ``handle.last[i].outliers`` are
visual indices (the index space of ``kept``).
"""
from __future__ import annotations

from functools import partial

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlprune.errors import VlpruneError
from vlprune.registry import register_patcher
from vlprune.sequence import block_rows, placeholder_positions

from ._llm import LLMImage
from ._tower import view_signals
from ._anyres import Layout, NextImageRecord, anyres_layout, split_budget  # noqa: F401 - NextImageRecord: public
from ._hf_llava import HFLlava



@register_patcher("LlavaNextForConditionalGeneration")
class LlavaNextHF(HFLlava):
    ragged_llm = True
    provides = {**HFLlava.provides,
                "decoding": "substitute: AnyRes has one [CLS] per view, so the k outliers are the top-k over all "
                            "views' tokens, each scored by its own view's [CLS] row; the outlier-only prompt holds "
                            "those k tokens, no newlines"}

    def install(self):
        cfg = self.model.config
        vcfg = cfg.vision_config
        self.side = vcfg.image_size // vcfg.patch_size
        self.pinpoints = tuple(tuple(int(x) for x in p) for p in cfg.image_grid_pinpoints)
        self._image_sizes = None
        super().install()

    def _pruned_projector(self):
        """None: ``_encode`` runs the tower and the projector itself, per image and view."""
        return None

    def layout(self, size) -> Layout:
        return anyres_layout(tuple(int(x) for x in size), self.pinpoints, self.model.config.vision_config.image_size,
                             self.side)

    # -- the pruned call --------------------------------------------------------------------------
    def _images(self, kw):
        """(image mask, layouts, placeholder blocks, batch rows) of a call, checked against each other."""
        sizes = kw.get("image_sizes")
        sizes = self._image_sizes if sizes is None else sizes
        if sizes is None:
            raise VlpruneError("LLaVA-NeXT calls need image_sizes next to pixel_values (the processor returns them)")
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if ids is None and embeds is None:
            raise VlpruneError("pass input_ids or inputs_embeds together with pixel_values")
        pixel_values = kw.get("pixel_values")
        if pixel_values is not None and pixel_values.dim() == 5 and pixel_values.shape[0] != len(sizes):
            raise VlpruneError(f"image features and placeholders do not match: {pixel_values.shape[0]} images in "
                               f"pixel_values, {len(sizes)} in image_sizes")
        image_mask = self._image_mask(ids, embeds)
        sizes = sizes.tolist() if torch.is_tensor(sizes) else sizes  # host sync: layout metadata, read by HF too
        layouts = [self.layout(size) for size in sizes]
        blocks = placeholder_positions(image_mask, [layout.placeholders for layout in layouts])
        rows = block_rows(blocks)
        return image_mask, layouts, blocks, rows

    def _prepare(self, kw: dict, generating: bool):
        layer, _ = self._feature_args(kw)
        image_mask, layouts, blocks, rows = self._images(kw)
        ks = [self.keep_count(layout.visual) for layout in layouts]
        if self.identity(rows, [layout.visual for layout in layouts], image_mask.device,
                         lambda i, r, kept: layouts[i].record(r, kept)):
            return kw, 0
        pixel_values = kw["pixel_values"]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[: layout.n_views] for pv, layout in zip(pixel_values, layouts)])
        if pixel_values.shape[0] != sum(layout.n_views for layout in layouts):
            raise VlpruneError(f"pixel_values hold {pixel_values.shape[0]} views; image_sizes call for "
                               f"{sum(layout.n_views for layout in layouts)}")
        feats, records = self._encode(pixel_values, layer, layouts, ks, rows)
        keep = ~image_mask
        for block, layout, rec in zip(blocks, layouts, records):
            chosen = block[torch.cat(layout.kept_offsets(rec.kept.to(block.device)))]
            keep[chosen[:, 0], chosen[:, 1]] = True
        self.handle.last = records
        kw = dict(kw)
        kw.pop("image_sizes", None)
        return self._shorten(kw, keep, BaseModelOutputWithPooling(pooler_output=feats), generating)

    def _encode(self, pixel_values, layer, layouts, ks, rows):
        """Per image: each view's share of k chosen by the method, projected, packed with the newlines of
        the rows that keep a token. Returns (packed features per image, records)."""
        stage = self.handle.method.stage
        projector = self.inner.multi_modal_projector
        quotas = [split_budget(k, [len(v.local) for v in layout.views]) for layout, k in zip(layouts, ks)]
        if stage == "in_encoder":
            parts = self._in_encoder_parts(pixel_values, layer, layouts, quotas)
        else:
            parts = self._selected_parts(pixel_values, layer, layouts, quotas)
        feats_out, records = [], []
        for layout, row, image_parts in zip(layouts, rows, parts):
            kept, order = torch.cat([p[1] for p in image_parts]).sort()
            tokens = torch.cat([p[2] for p in image_parts])[order]
            if stage != "projector":
                tokens = projector(tokens.unsqueeze(0))[0]
            feats_out.append(self._pack(layout, kept, tokens))
            records.append(layout.record(row, kept, *self._over_image(layout, image_parts, order)))
        return feats_out, records

    def _selected_parts(self, pixel_values, layer, layouts, quotas):
        """Stages encoder/projector: the tower once over every view, then the method on each view with a
        quota, among its unpadded tokens. Per image: (view, kept visual indices, tokens, scores, sources)
        per view."""
        stage = self.handle.method.stage
        feats, signals, _ = self._tower(pixel_values, layer)
        parts, first = [], 0
        for layout, view_quotas in zip(layouts, quotas):
            views = feats[first : first + layout.n_views]
            source = self.inner.multi_modal_projector(views) if stage == "projector" else views
            image_parts = []
            for view, q in zip(layout.views, view_quotas):
                if q == 0:
                    continue
                out, sel = self.prune(source[view.index][view.local].unsqueeze(0), view.grid,
                                      view_signals(signals, first + view.index, view.local), k=q)
                image_parts.append((view, view.visual.to(out.device)[sel.indices[0]], out[0],
                                    None if sel.scores is None else sel.scores[0],
                                    None if sel.sources is None else sel.sources[0]))
            parts.append(image_parts)
            first += layout.n_views
        return parts

    def _in_encoder_parts(self, pixel_values, layer, layouts, quotas):
        """Stage in_encoder: every view with a quota, of every image, through the tower in one pass, each
        pruned to its own quota; a view's first cut picks among the tokens unpadding leaves, and its
        survivors are mapped back to the image's visual indices."""
        n = self.side * self.side
        jobs, first = [], 0  # (image, view, quota, row of pixel_values)
        for i, (layout, view_quotas) in enumerate(zip(layouts, quotas)):
            jobs += [(i, view, q, first + view.index) for view, q in zip(layout.views, view_quotas) if q]
            first += layout.n_views
        device = pixel_values.device
        pixels = pixel_values[torch.tensor([job[3] for job in jobs], device=device)]
        visible = [None if len(view.local) == n else view.local for _, view, _, _ in jobs]
        feats, _, orig = self._tower(pixels, layer, [q for _, _, q, _ in jobs], visible)
        parts = [[] for _ in layouts]
        for row, (i, view, q, _) in enumerate(jobs):  # each row: its q real tokens first
            to_visual = torch.full((n,), -1, dtype=torch.long, device=orig.device)
            to_visual[view.local.to(orig.device)] = view.visual.to(orig.device)
            parts[i].append((view, to_visual[orig[row, :q]], feats[row, :q], None, None))
        return parts

    def _tower(self, pixel_values, layer, k=0, visible=None):
        """The vision tower once over ``pixel_values`` with the taps (and an in-encoder method's cuts to k,
        or k[i] for row i) live: (feature-layer patch tokens, signals, the surviving patch indices of an
        in-encoder pass)."""
        n = self.side * self.side
        with self.tower.encoding(n, pixel_values.shape[0], k, pixel_values.device, visible) as call:
            hidden = self.inner.vision_tower(pixel_values, output_hidden_states=layer, return_dict=True).hidden_states
            signals, orig = call.signals(), call.state["orig"]
        feats = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], dim=-1)
        return feats[:, 1:], signals, orig

    def _pack(self, layout, kept, tokens):
        """The image's features as the LM receives them: kept tokens, a newline after each non-empty row."""
        vis, nl = layout.kept_offsets(kept)
        newline = self.inner.image_newline.to(tokens.device, tokens.dtype)
        order = torch.cat([vis, nl.to(vis.device)]).argsort()
        return torch.cat([tokens, newline.expand(len(nl), -1)])[order]

    @staticmethod
    def _over_image(layout, parts, order):
        """The views' scores (N,) and merge sources (k, N) over the image's visual tokens (None where the
        method gives none; NaN scores for a view that got no budget)."""
        scores = sources = None
        dev = order.device
        if any(p[3] is not None for p in parts):
            scores = torch.full((layout.visual,), float("nan"), device=dev)
            for view, _, _, view_scores, _ in parts:
                scores[view.visual.to(dev)] = view_scores.float()
        if any(p[4] is not None for p in parts):
            blocks = []
            for view, kept, _, _, view_sources in parts:
                block = view_sources.new_zeros(len(kept), layout.visual)
                block[:, view.visual.to(dev)] = view_sources
                blocks.append(block)
            sources = torch.cat(blocks)[order]
        return scores, sources

    def _forward_llm(self, original, kw):
        image_mask, layouts, blocks, rows = self._images(kw)
        images = [self._llm_image(r, block, layout) for r, block, layout in zip(rows, blocks, layouts)]
        self.handle.last = [image.untouched() for image in images]
        if all(image.k >= layout.visual for image, layout in zip(images, layouts)):
            return original(**kw)
        return self.llm.run(original, kw, image_mask, images, self._prompt_len)

    def _llm_image(self, row, block, layout) -> LLMImage:
        """The method sees the image's N visual tokens as one (1, N) grid (newlines excluded); a newline
        stays with every high-res row that keeps a token."""
        places = block[layout.offsets(torch.arange(layout.visual, device=block.device))]
        return LLMImage(row, places, (1, layout.visual), self.keep_count(layout.visual),
                        record=partial(layout.record, row),
                        companions=lambda kept: block[layout.kept_offsets(kept)[1]])

    # -- damro: the hooks HFLlava._contrast_session calls -----------------------------------------
    def _outlier_scores(self, kw):
        """One tower pass over every view with the decoder's taps: (each image's [CLS] scores over its N
        visual tokens, each token's from its own view's head-mean row; the packed projected features)."""
        layer, strategy = self._feature_args(kw)
        _, layouts, _, _ = self._images(kw)
        feats, rows = self.contrast_taps.capture(lambda: self.inner.get_image_features(
            pixel_values=kw["pixel_values"], image_sizes=kw["image_sizes"], vision_feature_layer=layer,
            vision_feature_select_strategy=strategy, return_dict=True))
        scores, first = [], 0
        for layout in layouts:
            image = rows.new_empty(layout.visual)  # every visual index belongs to exactly one view
            for view in layout.views:
                image[view.visual.to(rows.device)] = rows[first + view.index, view.local.to(rows.device)]
            scores.append(image)
            first += layout.n_views
        return scores, feats

    def _image_blocks(self, kw):
        """Placeholder blocks with newlines; a visual index's offset skips the newlines before it."""
        image_mask, layouts, blocks, _ = self._images(kw)
        return image_mask, blocks, [layout.offsets for layout in layouts]

    def _generate(self, original, kw):
        self._image_sizes = kw.get("image_sizes")  # generate() encodes the images and drops them before forward
        try:
            return super()._generate(original, kw)
        finally:
            self._image_sizes = None
