"""Per-family model configs at any scale: the one place random-weight models are shaped.

``vlprune-bench`` builds real vision geometries (CLIP ViT-L/14-336, Qwen2.5-VL-7B's tower) with an LM of
the 7B's proportions at a chosen width and depth; the tests build tiny ones (64-wide, a 4 x 4 patch grid)
from the same functions, so a family's wiring (image token, feature layer, pinpoints, M-RoPE ids) is
written once. Each ``*_config`` takes the vision and text shapes as dicts and returns the HF config;
``build`` instantiates one with seeded random weights.
"""
from __future__ import annotations

import torch

from vlprune.errors import VlpruneError

IMAGE_TOKEN = 32000  # LLaVA-1.5 / NeXT (Vicuna vocabulary of 32064)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
#: a hidden test hook (``--tiny-vision``): the same depth, patch and image geometry, 64 wide
CLIP_TINY = dict(CLIP_L_336, hidden_size=64, intermediate_size=128, num_attention_heads=4, projection_dim=64)
NEXT_7B_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
QWEN_7B_VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, tokens_per_second=2, hidden_act="silu")
QWEN_TINY_VISION = dict(QWEN_7B_VISION, hidden_size=64, num_heads=2, intermediate_size=128)
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                vision_end_token_id=151653)


# -- LM shapes -----------------------------------------------------------------------------------------
def lm_heads(width: int) -> tuple[int, int]:
    """(heads, head_dim): 128-dim heads as in the 7B models, 64-dim below 128 wide (the test scale)."""
    if width < 64 or width % 64:
        raise VlpruneError(f"--lm-width must be a positive multiple of 64 (128-dim heads from 128 on); got {width}")
    head_dim = 128 if width % 128 == 0 else 64
    return width // head_dim, head_dim


def llama_text(width: int, layers: int, vocab: int = 32064) -> dict:
    """Vicuna-7B's Llama at another width/depth: MHA, MLP 11008/4096 of the width."""
    heads, _ = lm_heads(width)
    return dict(vocab_size=vocab, hidden_size=width, intermediate_size=width * 11008 // 4096,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=8192, pad_token_id=0)


def qwen_text(width: int, layers: int) -> dict:
    """Qwen2.5-7B's decoder at another width/depth: >= 7 query heads per key/value head (7B: 28/4), MLP 18944/3584
    of the width, M-RoPE sections in the 7B's proportions (16/24/24 of a 128-dim head's 64 frequencies)."""
    heads, head_dim = lm_heads(width)
    kv = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= max(1, heads // 7))
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    return dict(vocab_size=152064, hidden_size=width, intermediate_size=width * 18944 // 3584, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768, pad_token_id=151643,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section})


# -- one config per family -------------------------------------------------------------------------------
def llava15_config(vision: dict, text: dict, image_token: int = IMAGE_TOKEN):
    """LLaVA-1.5 (any LlavaForConditionalGeneration): a CLIP tower (or, with its ``model_type`` in
    ``vision``, another, as the embedded model's DINOv2) read at layer -2 without its [CLS]."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tower = vision if "model_type" in vision else CLIPVisionConfig(**vision)
    return LlavaConfig(vision_config=tower, text_config=LlamaConfig(**text),
                       image_token_id=image_token, vision_feature_layer=-2, vision_feature_select_strategy="default")


def llava_next_config(vision: dict, text: dict, pinpoints, image_token: int = IMAGE_TOKEN):
    """LLaVA-NeXT: LLaVA-1.5's wiring plus AnyRes views on ``pinpoints``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    return LlavaNextConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                           image_token_id=image_token, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints)


def qwen2_5_vl_config(vision: dict, text: dict, ids: dict = QWEN_IDS):
    """Qwen2.5-VL: its windowed tower and 2 x 2 merger (``vision``), an M-RoPE decoder (``text``) and the
    image/video/vision-start/end token ids."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(vision_config=dict(vision, out_hidden_size=text["hidden_size"]), text_config=text, **ids)


def build(cls, config, device="cpu", dtype=None, attn: str = "sdpa", seed: int = 0):
    """``cls`` (a model class) with seeded random weights for ``config``, on ``device``, in eval mode."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(config, attn_implementation=attn, **({"dtype": dtype} if dtype else {}))
    return model.eval()
