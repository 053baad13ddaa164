"""A tiny random LLaVA in the ORIGINAL checkpoint format (``llava-torch``), loaded as its users load it.

The directory holds what ``llava.model.builder.load_pretrained_model`` expects: a ``llava_llama`` config
whose ``mm_vision_tower`` points at a CLIP vision model saved next to it with ``save_pretrained`` (plus
its image processor), the LM + projector weights (no tower weights: the tower loads from its own folder,
as real checkpoints do), and a tokenizer. Prompts hold one ``IMAGE_TOKEN_INDEX`` (-200) per image.
"""
from __future__ import annotations

import warnings

import torch

from tiny import DEVICE, PAD, VOCAB, sharpen

IMAGE_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX (not imported here: llava is optional)
SIZE = 56  # 4 x 4 = 16 patches of 14 px
N = 16


def build(root, vision_layers=12, lm_layers=4, image_size=SIZE, vision=None, seed=0):
    """Save the tower and the checkpoint under ``root``; return the checkpoint's path (its name has "llava")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    torch.manual_seed(seed)
    vision = vision or CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers,
                                        num_attention_heads=4, image_size=image_size, patch_size=14, projection_dim=64)
    tower = CLIPVisionModel._from_config(vision)
    sharpen(tower)
    tower_dir = root / "clip-tower"
    tower.save_pretrained(tower_dir)
    side = vision.image_size
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(tower_dir)

    cfg = LlavaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=lm_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=PAD,
                      bos_token_id=1, eos_token_id=2)
    cfg.update({"mm_vision_tower": str(tower_dir), "mm_hidden_size": vision.hidden_size, "mm_projector_type": "mlp2x_gelu",
                "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
                "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad",
                "use_mm_proj": True, "tokenizer_padding_side": "left"})  # left: batched generate continues each row
    model = LlavaLlamaForCausalLM(cfg)  # the tower is built delay-loaded: no tower weights in the checkpoint
    with torch.no_grad():  # varied greedy tokens, so comparing generated ids can fail
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(2.0)
    path = root / "llava-tiny"
    model.save_pretrained(path)

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", padding_side="left").save_pretrained(path)
    return path


def load(path, float32=True):
    """``load_pretrained_model`` as a user calls it (it loads fp16); the tests then use float32 so that
    batch == single runs bit for bit (fp16 on CPU rounds differently per shape)."""
    from llava.model.builder import load_pretrained_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _tok, model, _proc, _ctx = load_pretrained_model(str(path), None, "llava-tiny", device_map=str(DEVICE),
                                                         device=str(DEVICE))
    model.generation_config.pad_token_id = PAD
    return (model.float() if float32 else model).eval()


def prompt(n_images=1, text_before=(1, 7, 8), text_after=(9, 10, 11)):
    ids = list(text_before)
    for _ in range(n_images):
        ids += [IMAGE_INDEX, 12]
    return ids + list(text_after)


def greedy(model, ids, mask, images, steps):
    """Greedy decoding with the UNPATCHED forward and no cache (the reference for generate, whose unpatched
    form fails under transformers 5). Position ids are passed so the original code numbers each prompt's
    content 0..L-1, as generate() does from the attention mask."""
    eos, new = model.generation_config.eos_token_id, []
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, images=images, position_ids=torch.zeros_like(ids)).logits[:, -1]
            token = logits.argmax(-1).masked_fill(done, PAD)
            done |= token == eos if eos is not None else done
            new.append(token)
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if bool(done.all()):  # generate() stops here too
                break
    return torch.stack(new, 1)
