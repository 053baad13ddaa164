"""Tiny fixtures for the eval-harness tests: a random LLaVA checkpoint *with a processor* (so lmms-eval's
``llava_hf`` can load it like a real one) and a three-item local lmms-eval task."""
from __future__ import annotations

import json
from pathlib import Path

import tiny

TEMPLATE = ("{% for m in messages %}USER: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
TASK = "tiny_scenes"


def save_checkpoint(path: Path) -> Path:
    """A 2-layer CLIP + 2-layer Llama LLaVA (56 px images, 16 patches) and a word-level LlavaProcessor."""
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    from vlprune.embedded.model import build_tokenizer

    tok = build_tokenizer()
    cfg = tiny.llava_config(vision_layers=3, lm_layers=2)
    cfg.image_token_id = tok.convert_tokens_to_ids("<image>")
    cfg.text_config.pad_token_id = tok.pad_token_id
    import torch

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    image = CLIPImageProcessor(size={"height": 56, "width": 56}, crop_size={"height": 56, "width": 56},
                               do_center_crop=False)
    LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=TEMPLATE).save_pretrained(path)
    return path


def write_task(folder: Path, n: int = 3) -> Path:
    """``tiny_scenes``: the first ``n`` held-out scene questions, scored by vlprune's scenes task functions."""
    from vlprune.embedded import scenes

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.jsonl", "w") as f:
        for it in scenes.test_items(n):
            f.write(json.dumps({k: it[k] for k in ("index", "scene", "qtype", "question", "answer") if k in it}) + "\n")
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: items.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function vlprune.eval.scenes_task.doc_to_visual
doc_to_text: !function vlprune.eval.scenes_task.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 2
  do_sample: false
process_results: !function vlprune.eval.scenes_task.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
""")
    return folder


def write_prompts(folder: Path, n: int = 6) -> Path:
    """A JSONL of ``n`` {"image", "question", "answer"} rows on random 40x40 images, as `vlprune-train
    METHOD --model ... --data FILE.jsonl` reads it."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
        rows.append(json.dumps({"image": f"im{i}.png", "question": "what is here", "answer": "a dog" if i % 2 else "b"}))
    (folder / "data.jsonl").write_text("\n".join(rows) + "\n")
    return folder / "data.jsonl"
