"""``vlprune-bench``: latency, memory and FLOPs of each method and budget, against three references.

In one run, on one model (real geometry, random weights: shapes and timings are real, answers are not):

- **unpruned** - the model as loaded;
- **ideal** - the same weights fed the first k image tokens directly (tower, projector on k tokens,
  shorter LM sequence): what a k-token model costs with zero scoring;
- **eager reference** - what the reference repos do: the vision tower switched to eager attention
  with ``output_attentions=True`` to read the [CLS] row, top-k, then the same shortened LM;
- every method at every budget, patched with ``vlprune.patch`` (the tower keeps its attention
  implementation, stated in the output).

Per setting: prefill latency (median after warm-up), decode latency per new token, end-to-end
``generate`` latency, peak memory above the loaded model (CUDA: ``max_memory_allocated``; CPU: peak
of malloc'd bytes in use, sampled), and analytic FLOPs (see ``vlprune.eval.flops``). Writes JSON, CSV, a
Markdown table and plots to ``--output``.

    vlprune-bench --quick                      # a minute or two on a laptop CPU
    vlprune-bench --device cuda --dtype bfloat16 --lm-layers 32
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import json
import os
import statistics
import threading
import time
from pathlib import Path

import torch

import vlprune
from vlprune.budget import Budget
from vlprune.registry import get_method

from . import cpu_name
from .flops import LengthRecorder, llava_prefill_flops

IMAGE_TOKEN = 32000


# -- the model ---------------------------------------------------------------------------------------
def build_llava15(device, dtype, lm_layers: int, lm_width: int, attn: str, seed: int = 0):
    """LLaVA-1.5-7B shapes: CLIP ViT-L/14-336 exactly; a Llama LM of ``lm_width`` (4096 = 7B) and depth."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=lm_width, intermediate_size=lm_width * 11008 // 4096,
                       num_hidden_layers=lm_layers, num_attention_heads=lm_width // 128,
                       num_key_value_heads=lm_width // 128, max_position_embeddings=4096, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn, dtype=dtype)
    return model.eval()


def llava15_inputs(batch: int, device, dtype, n: int = 576, before: int = 20, after: int = 30):
    ids = torch.tensor([[1] + [7] * before + [IMAGE_TOKEN] * n + [9] * after], device=device).repeat(batch, 1)
    g = torch.Generator(device="cpu").manual_seed(0)
    pixels = torch.randn(batch, 3, 336, 336, generator=g).to(device=device, dtype=dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


# -- the two hand-written references ----------------------------------------------------------------
def ideal_call(model, inputs, k: int):
    """The same weights fed the first k image tokens: tower, projector on k, LM on the short sequence."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    ids = inputs["input_ids"]
    image = ids == model.config.image_token_id
    n = int(image[0].sum())
    keep = ~image
    keep[:, image[0].nonzero()[:k, 0]] = True
    short = ids[keep].view(ids.shape[0], -1)

    def run(**gen):
        tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=model.config.vision_feature_layer)
        feats = model.model.multi_modal_projector(tower.hidden_states[model.config.vision_feature_layer][:, 1 : k + 1])
        mm = {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}
        kw = dict(input_ids=short, attention_mask=torch.ones_like(short), mm_encoder_outputs=mm)
        if gen:
            return model.generate(**kw, **gen)
        return model(**kw, logits_to_keep=1)

    assert k <= n
    return run


def eager_reference_call(model, inputs, k: int):
    """The reference repos' way: eager tower with all attention maps, [CLS] row of layer -2, top-k."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    ids = inputs["input_ids"]
    image = ids == model.config.image_token_id
    positions = image[0].nonzero()[:, 0]
    tower = model.model.vision_tower

    def run(**gen):
        previous = tower.config._attn_implementation
        tower.set_attn_implementation("eager")
        try:
            out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        finally:
            tower.set_attn_implementation(previous)
        scores = out.attentions[-2][:, :, 0, 1:].mean(1)
        kept = scores.topk(k, dim=-1).indices.sort(dim=-1).values
        feats = out.hidden_states[-2][:, 1:].gather(1, kept.unsqueeze(-1).expand(-1, -1, out.hidden_states[-2].shape[-1]))
        feats = model.model.multi_modal_projector(feats)
        keep = ~image
        keep[:, positions[:k]] = True  # placeholders are interchangeable: k of them per image
        short = ids[keep].view(ids.shape[0], -1)
        kw = dict(input_ids=short, attention_mask=torch.ones_like(short),
                  mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=list(feats))})
        if gen:
            return model.generate(**kw, **gen)
        return model(**kw, logits_to_keep=1)

    return run


# -- measuring ---------------------------------------------------------------------------------------
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, repeats: int, warmup: int = 1) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use():
    """Bytes malloc has handed out and not got back (glibc's mallinfo2: heap chunks + mmapped chunks).

    Unlike RSS it falls again when tensors are freed and is not fooled by the allocator reusing pages,
    so the peak during a block is the block's own peak. None where glibc's mallinfo2 is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def used() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return used


class PeakMemory:
    """Peak memory above the start of the block: the CUDA allocator's peak, or on CPU the peak of
    malloc'd bytes in use (sampled every 0.2 ms; process RSS where mallinfo2 is unavailable)."""

    _in_use = _heap_in_use()

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.peak_mb = 0.0

    @classmethod
    def _rss(cls) -> int:
        if cls._in_use is not None:
            return cls._in_use()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._rss()
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, self._rss())
            time.sleep(0.0002)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = (max(self._max, self._rss()) - self._base) / 2**20
        return False


def measure(model, prefill, generate, args) -> dict:
    """Latencies, peak memory and FLOPs of one setting (``prefill()`` / ``generate(**kw)`` closures)."""
    device = args.device
    rec = LengthRecorder(model.model.vision_tower.encoder.layers, model.model.language_model.layers,
                         model.model.multi_modal_projector)
    try:  # the warm-up run also records the lengths each layer sees
        with torch.inference_mode():
            prefill()
        flops = llava_prefill_flops(model.config, rec)
    finally:
        rec.close()
    prefill_ms = median_ms(prefill, device, args.repeats, warmup=0)
    with PeakMemory(device) as mem, torch.inference_mode():
        prefill()
    new = args.new_tokens
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    reps = max(1, args.repeats // 2)
    e2e_ms = median_ms(lambda: generate(**gen), device, reps, warmup=0)
    first_ms = median_ms(lambda: generate(max_new_tokens=1, do_sample=False), device, reps, warmup=0)
    return {"prefill_ms": prefill_ms, "decode_ms_per_token": (e2e_ms - first_ms) / max(1, new - 1),
            "generate_ms": e2e_ms, "peak_mem_mb": mem.peak_mb, "tflops": flops["total"] / 1e12,
            "vision_tflops": flops["vision"] / 1e12, "llm_tflops": flops["llm"] / 1e12}


def machine(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"


# -- the run -----------------------------------------------------------------------------------------
def run(args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    model = build_llava15(args.device, dtype, args.lm_layers, args.lm_width, args.attn)
    inputs = llava15_inputs(args.batch, args.device, dtype)
    n = 576
    rows = []

    def add(method, k, stats):
        rows.append({"method": method, "keep": k, **stats})
        print(f"  {method:>16} k={k:<4} prefill {stats['prefill_ms']:9.1f} ms  {stats['tflops']:.3f} TFLOPs  "
              f"mem +{stats['peak_mem_mb']:.0f} MB", flush=True)

    def plain(**gen):
        return model.generate(**inputs, **gen) if gen else model(**inputs, logits_to_keep=1)

    add("unpruned", n, measure(model, plain, plain, args))
    for k in args.keeps:
        ideal = ideal_call(model, inputs, k)
        add("ideal", k, measure(model, ideal, ideal, args))
        eager = eager_reference_call(model, inputs, k)
        add("eager-reference", k, measure(model, eager, eager, args))
        for method in args.methods:
            budget = {"keep": k} if get_method(method).budgeted else {}
            if not budget and k != args.keeps[0]:
                continue  # not budgeted: one run is enough
            with vlprune.pruned(model, method, **budget) as h:
                stats = measure(model, plain, plain, args)
                stats["kept"] = h.last[0].after
            add(method, stats["kept"] if not budget else k, stats)
    unpruned = rows[0]
    ideal = {r["keep"]: r for r in rows if r["method"] == "ideal"}
    eager = {r["keep"]: r for r in rows if r["method"] == "eager-reference"}
    for r in rows:
        r["vs_unpruned"] = r["prefill_ms"] / unpruned["prefill_ms"]
        if r["keep"] in ideal:
            r["vs_ideal"] = r["prefill_ms"] / ideal[r["keep"]]["prefill_ms"]
            r["scoring_share"] = max(0.0, r["prefill_ms"] - ideal[r["keep"]]["prefill_ms"]) / r["prefill_ms"]
        if r["keep"] in eager:
            r["eager_vs_this"] = eager[r["keep"]]["prefill_ms"] / r["prefill_ms"]
    for r in rows:
        r.update(device=machine(args.device), dtype=args.dtype, batch=args.batch, attn=args.attn,
                 lm_layers=args.lm_layers, lm_width=args.lm_width, torch=torch.__version__)
    return rows


def markdown(rows, args) -> str:
    r0 = rows[0]
    head = (f"LLaVA-1.5 shapes (CLIP ViT-L/14-336 tower, 24 layers; Llama LM width {args.lm_width}, "
            f"{args.lm_layers} layers), random weights, {args.dtype}, batch {args.batch}, attention "
            f"`{args.attn}`, {args.new_tokens} new tokens; on {r0['device']}, torch {r0['torch']}.\n\n")
    lines = ["| method | visual tokens | prefill ms | × unpruned | × ideal | eager ref ÷ this | decode ms/tok | "
             "generate ms | peak MB | TFLOPs |", "|---|---|---|---|---|---|---|---|---|---|"]

    def f(r, key, fmt):
        return format(r[key], fmt) if key in r else "–"

    for r in rows:
        lines.append(f"| {r['method']} | {r['keep']} | {r['prefill_ms']:.1f} | {f(r, 'vs_unpruned', '.2f')} | "
                     f"{f(r, 'vs_ideal', '.2f')} | {f(r, 'eager_vs_this', '.2f')} | {r['decode_ms_per_token']:.1f} | "
                     f"{r['generate_ms']:.0f} | {r['peak_mem_mb']:.0f} | {r['tflops']:.3f} |")
    return head + "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "prefill_ms", "prefill latency (ms)"), (axes[1], "peak_mem_mb", "peak memory (MB)")):
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "unpruned"):
            pts = sorted((r["keep"], r[key]) for r in rows if r["method"] == method)
            style = "--" if method == "ideal" else ":" if method == "eager-reference" else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=method)
        ax.axhline(rows[0][key], color="grey", lw=0.8, label="unpruned")
        ax.set_xlabel("visual tokens kept")
        ax.set_ylabel(label)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"vlprune-bench on {rows[0]['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="vlprune-bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small LM, few budgets and methods: a minute or two on a CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--methods", default=None, help="comma list (default: every registered method)")
    p.add_argument("--keeps", default="192,128,64", help="visual tokens kept per image, comma list")
    p.add_argument("--lm-layers", type=int, default=None)
    p.add_argument("--lm-width", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--output", default="vlprune-bench")
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.quick:
        args.methods = args.methods or "fastervlm,pool,fastv"
        args.keeps = "64" if args.keeps == "192,128,64" else args.keeps
        args.lm_layers = args.lm_layers or 4
        args.lm_width = 1024 if args.lm_width == 4096 else args.lm_width
        args.new_tokens = min(args.new_tokens, 4)
        args.repeats = args.repeats or 1
    args.lm_layers = args.lm_layers or (32 if cuda else 4)
    args.repeats = args.repeats or (10 if cuda else 3)
    args.methods = (args.methods or ",".join(vlprune.methods())).split(",")
    for m in args.methods:
        get_method(m)  # unknown names fail before any model is built
    args.keeps = [int(k) for k in args.keeps.split(",")]
    for k in args.keeps:
        Budget(keep=k)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    print(f"vlprune-bench on {machine(args.device)}: methods {','.join(args.methods)}, keeps {args.keeps}", flush=True)
    rows = run(args)
    (out / "bench.json").write_text(json.dumps(rows, indent=1))
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, args)
    (out / "bench.md").write_text(table)
    plot(rows, out / "bench.png")
    print(table)
    print(f"wrote {out}/bench.json, bench.csv, bench.md, bench.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
