"""Prefill latency of pruned LLaVA-1.5 versus unpruned and versus the ideal, at real model size.

The model has LLaVA-1.5-7B's exact shapes (CLIP ViT-L/14-336 + Llama-2-7B-sized LM) with random
weights: timings and token counts are real, answers are not (no accuracy from this script). The
*ideal* is what a k-token model costs: the vision tower on the image plus the LM on the shortened
sequence, with no scoring or selection at all; pruned minus ideal is the method's own overhead.

    python -m vlprune.eval.bench_prefill --device cuda --dtype bfloat16 --keeps 192,128,64
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import vlprune

IMAGE_TOKEN = 32000


def build(device, dtype, lm_layers=32, attn="sdpa"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=lm_layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn, dtype=dtype)
    return model.eval()


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def timed(fn, device, repeats):
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--methods", default="fastervlm,random,uniform,pool")
    p.add_argument("--keeps", default="192,128,64")
    p.add_argument("--lm-layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    model = build(args.device, dtype, args.lm_layers)
    n = 576
    ids = torch.tensor([[1] + [7] * 20 + [IMAGE_TOKEN] * n + [9] * 30], device=args.device).repeat(args.batch, 1)
    mask = torch.ones_like(ids)
    pv = torch.randn(args.batch, 3, 336, 336, device=args.device, dtype=dtype)
    length = ids.shape[1]

    def forward(**kw):
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask, pixel_values=pv, logits_to_keep=1, **kw)

    def ideal(k):
        embeds = torch.randn(args.batch, length - n + k, 4096, device=args.device, dtype=dtype)

        def run():
            with torch.inference_mode():
                model.model.vision_tower(pv)
                model(inputs_embeds=embeds, logits_to_keep=1)
        return run

    base = timed(forward, args.device, args.repeats)
    rows = [{"method": "unpruned", "keep": n, "lm_tokens": length, "prefill_ms": base}]
    for k in [int(x) for x in args.keeps.split(",")]:
        rows.append({"method": "ideal", "keep": k, "lm_tokens": length - n + k,
                     "prefill_ms": timed(ideal(k), args.device, args.repeats)})
        for method in args.methods.split(","):
            with vlprune.pruned(model, method, keep=k) as h:
                ms = timed(forward, args.device, args.repeats)
                assert h.last[0].after == k
            rows.append({"method": method, "keep": k, "lm_tokens": length - n + k, "prefill_ms": ms})
    where = device_name(args.device)
    print(f"# prefill, LLaVA-1.5-7B shapes, random weights, {args.dtype}, batch {args.batch}, "
          f"torch {torch.__version__}, on {where}")
    print("| method | visual tokens | LM tokens | prefill ms | speed-up |")
    print("|---|---|---|---|---|")
    for r in rows:
        r.update(device=where, dtype=args.dtype, batch=args.batch, speedup=base / r["prefill_ms"])
        print(f"| {r['method']} | {r['keep']} | {r['lm_tokens']} | {r['prefill_ms']:.2f} | {r['speedup']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
