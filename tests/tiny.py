"""Tiny random models built from configs, saved and loaded the way a user loads a checkpoint.

``VLPRUNE_TEST_DEVICE=cuda`` runs the same suite on a GPU (models and inputs are placed there).
"""
from __future__ import annotations

import os

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from vlprune.eval import configs

DEVICE = torch.device(os.environ.get("VLPRUNE_TEST_DEVICE", "cpu"))
IMAGE_TOKEN = 5
PAD = 0
VOCAB = 64
IMAGE_SIZE = 56  # 4 x 4 = 16 patches of 14 px


def tiny_text(lm_layers=4) -> dict:
    """The tests' 64-wide Llama LM (GQA 4/2) on a 64-token vocabulary."""
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=lm_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=PAD,
                bos_token_id=1, eos_token_id=2)


def tiny_clip(vision_layers=12, image_size=IMAGE_SIZE, patch=14, vision_hidden=64, heads=4, vision_intermediate=None):
    return dict(hidden_size=vision_hidden, intermediate_size=vision_intermediate or 2 * vision_hidden,
                num_hidden_layers=vision_layers, num_attention_heads=heads, image_size=image_size, patch_size=patch,
                projection_dim=vision_hidden)


def llava_config(vision_layers=12, image_size=IMAGE_SIZE, patch=14, vision_hidden=64, heads=4, lm_layers=4,
                 vision_intermediate=None):
    return configs.llava15_config(tiny_clip(vision_layers, image_size, patch, vision_hidden, heads, vision_intermediate),
                                  tiny_text(lm_layers), IMAGE_TOKEN)


def fail_if_left_patched(model):
    """Remove a patch a test left installed, and fail that test: the next one must get a clean model."""
    leftover = model.__dict__.get("_vlprune")
    if leftover is not None:
        leftover.remove()
        pytest.fail("test left a patch installed")


def sharpen(module):
    """Scale every weight matrix by 3: random init gives near-uniform attention, so rankings would be ties."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 2:
                p.mul_(3.0)


def build_llava(path=None, attn="sdpa", seed=0, **cfg):
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(llava_config(**cfg), attn_implementation=attn)
    sharpen(model)
    model.generation_config.suppress_tokens = [IMAGE_TOKEN]  # as real checkpoints, never emit the placeholder
    model.generation_config.pad_token_id = PAD
    model.eval()
    if path is None:
        return model.to(DEVICE)
    model.save_pretrained(path)
    return load(path, attn_implementation=attn)


def dinov2_llava(lm_layers=4):
    """A LLaVA with a tiny random DINOv2 tower (the embedded model's family): 6 layers x 64 wide, 56 px ->
    [CLS] + 16 patches, reading layer -2; a Llama LM 64 wide. Seeded, on the CPU."""
    torch.manual_seed(0)
    vision = dict(model_type="dinov2", hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128,
                  patch_size=14, image_size=56, use_mask_token=False)
    text = dict(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=lm_layers, num_attention_heads=4,
                num_key_value_heads=4, pad_token_id=0)
    cfg = configs.llava15_config(vision, text, image_token=5)
    return LlavaForConditionalGeneration._from_config(cfg).eval()


def load(path, **kwargs):
    """Load a saved tiny model the way a user loads a checkpoint, on the test device."""
    return LlavaForConditionalGeneration.from_pretrained(path, **kwargs).eval().to(DEVICE)


def prompt(n_images=1, text_before=(1, 7, 8), text_after=(9, 10, 11), n_patches=16):
    ids = list(text_before)
    for _ in range(n_images):
        ids += [IMAGE_TOKEN] * n_patches + [12]
    return ids + list(text_after)


def batch(prompts, pad_left=True):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        sl = slice(width - len(p), width) if pad_left else slice(0, len(p))
        ids[i, sl] = torch.tensor(p)
        mask[i, sl] = 1
    return ids.to(DEVICE), mask.to(DEVICE)


def pixels(n, size=IMAGE_SIZE, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g).to(DEVICE)


_GATES: dict = {}


def learned_options(model, method: str) -> dict:
    """Options a learned method needs on a tiny model: weights made for it (fresh, kept for the session)
    and, for dyvte, ``threshold=0`` so its tokens leave at the earliest layer like a fixed exit (the gate
    itself is tested in test_method_dyvte.py); tokenflex's block gets a non-zero output layer, so it is not
    plain pooling; atp's modules sit where ``default_layers`` puts them, thresholds as initialised."""
    if method not in ("dyvte", "tokenflex", "atp"):
        return {}
    import tempfile

    from vlprune import learned

    base = learned.signature(model)
    key = (method, *(base[k] for k in learned.SIGNATURE), feature_width(model))
    if key not in _GATES:
        g = torch.Generator().manual_seed(0)
        info = {}
        if method == "dyvte":
            from vlprune.builtin_methods.dyvte import gate_tensors

            tensors = gate_tensors(base["text_hidden_size"], 16, range(1, base["text_layers"]), g)
        elif method == "atp":
            from vlprune.builtin_methods.atp import default_layers, init_tensors

            tensors, info = init_tensors(default_layers(base["text_layers"]), 16, g), {"lam": 3.0}
        else:
            from vlprune.builtin_methods.tokenflex import init_tensors

            tensors = init_tensors(feature_width(model), 16, g)
            tensors["down.weight"] = torch.randn(tensors["down.weight"].shape, generator=g) * 0.1
        _GATES[key] = str(learned.save(tempfile.mkdtemp(prefix=f"vlprune-{method}-"), method, base, tensors, **info))
    return {"weights": _GATES[key], **({"threshold": 0.0} if method == "dyvte" else {})}


def feature_width(model) -> int:
    """The width of the features an encoder-stage method sees on this model."""
    cfg = getattr(model, "config", None)
    if cfg is None:  # open_clip: the tower's block outputs
        return model.visual.transformer.width
    vision = getattr(cfg, "vision_config", None)
    if vision is None:  # the original LLaVA code
        return cfg.mm_hidden_size
    return getattr(vision, "out_hidden_size", None) or vision.hidden_size
