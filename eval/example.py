"""``vlprune-example``: patch a LLaVA-1.5-shaped model with every method and show what changes.

The model is built locally from configs with **random weights** (nothing is downloaded): a CLIP vision
tower with the real LLaVA-1.5 geometry (336 px images, 14 px patches, 576 patch tokens, 24 layers) but
narrow, and a small Llama language model. Random weights mean the numbers below are about token counts
and prefill latency only; they say nothing about answer quality.

For each method and ratio the script patches the model, times the prefill (the median of ``--repeats``
forward passes after one warm-up), reads ``handle.last`` for the visual tokens kept, and removes the
patch again. It also runs greedy ``generate`` once per method and checks the unchanged output contract
(the prompt ids come back in front of the new ids), and that ratio 0 gives bit-identical logits. A
method this model's patcher cannot serve is listed as skipped, with the reason.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from PIL import Image, ImageDraw
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vlprune
from vlprune.eval import cpu_name
from vlprune.budget import Budget
from vlprune.registry import get_method

IMAGE_SIZE = 336  # CLIP ViT-L/14-336, as in LLaVA-1.5
PATCH = 14  # -> 24 x 24 = 576 patch tokens (+ [CLS])
IMAGE_TOKEN = 100
PAD, BOS, EOS = 0, 1, 2
VOCAB = 128
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's preprocessing constants
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_RATIOS = "0,0.75,0.889"
NOISY = 1.5  # slowest / fastest run of one setting above this: the timing was disturbed


def build_model(seed: int = 0) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-shaped model with random weights: real vision geometry and depth, cheap widths.

    The tower has CLIP ViT-L/14-336's 577 tokens and 24 layers (so every method's layer indices mean
    what they mean on the real checkpoint) but is 64 wide instead of 1024. The LM has 4 layers, enough
    for methods that act inside it from decoder layer 2 on.
    """
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=64, intermediate_size=256,
        num_hidden_layers=24, num_attention_heads=4, projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return model.eval()


def synthetic_image(size: int = IMAGE_SIZE) -> Image.Image:
    """A deterministic test picture: a sky-to-ground gradient with a sun, a house and a tree."""
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    horizon = size * 2 // 3
    for y in range(size):
        if y < horizon:
            t = y / horizon
            draw.line([(0, y), (size, y)], fill=(int(90 + 100 * t), int(150 + 60 * t), 235))
        else:
            draw.line([(0, y), (size, y)], fill=(60, int(150 - 40 * (y - horizon) / (size - horizon)), 50))
    s = size / 336
    draw.ellipse([250 * s, 30 * s, 310 * s, 90 * s], fill=(250, 215, 60))
    draw.rectangle([60 * s, 150 * s, 170 * s, 240 * s], fill=(200, 70, 55))
    draw.polygon([(50 * s, 150 * s), (115 * s, 95 * s), (180 * s, 150 * s)], fill=(120, 40, 35))
    draw.rectangle([100 * s, 195 * s, 125 * s, 240 * s], fill=(90, 60, 30))
    draw.rectangle([235 * s, 170 * s, 250 * s, 240 * s], fill=(100, 70, 40))
    draw.ellipse([205 * s, 115 * s, 280 * s, 190 * s], fill=(40, 120, 45))
    return img


def pixel_values(img: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float tensor, normalised with CLIP's mean and std (what the LLaVA processor does)."""
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    x = data.view(img.height, img.width, 3).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def prompt_ids(n_patches: int) -> torch.Tensor:
    """'USER: <image> ... ASSISTANT:' as made-up token ids, the image expanded to one id per patch."""
    before = [BOS, 10, 11, 12]
    after = [13, 14, 15, 16, 17, 18, 19, 20]
    return torch.tensor([before + [IMAGE_TOKEN] * n_patches + after])


def parse_ratios(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--ratios takes comma-separated numbers, e.g. {DEFAULT_RATIOS}") from err


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, cuda)"
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads (torch {torch.__version__}, cpu)"


def timed_prefill(model, inputs: dict, repeats: int, device: torch.device, handle=None):
    """Median prefill wall times (ms) of the model as patched and, if ``handle`` is given, unpruned.

    The two are measured alternately (unpruned through ``handle.disabled()``), after one warm-up, so
    that load from other processes on a shared machine hits both alike. Returns (pruned ms, unpruned ms
    or None, noisy, output of the last pruned call); ``noisy`` says that the slowest and the fastest run
    of one kind differ by more than ``NOISY`` times, i.e. something else was competing for the machine.
    """

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def once(disabled: bool):
        sync()
        t0 = time.perf_counter()
        if disabled:
            with handle.disabled():
                out = model(**inputs)
        else:
            out = model(**inputs)
        sync()
        return (time.perf_counter() - t0) * 1000.0, out

    pruned, unpruned = [], []
    with torch.inference_mode():
        _, out = once(False)  # warm-up (the unpruned path is warm from the unpatched baseline)
        for _ in range(repeats):
            if handle is not None:
                unpruned.append(once(True)[0])
            ms, out = once(False)
            pruned.append(ms)
    noisy = any(max(t) > NOISY * min(t) for t in (pruned, unpruned) if t)
    return statistics.median(pruned), (statistics.median(unpruned) if unpruned else None), noisy, out


def budgets(method: str, ratios: list[float]) -> list[tuple[str, dict]]:
    """(label, keyword arguments) per setting: one per ratio, or one setting for a method that decides
    by itself how many tokens to drop (``budgeted = False``, e.g. ``visual_exit``)."""
    if get_method(method).budgeted:
        return [(f"{r:g}", {"ratio": r}) for r in ratios]
    return [("own", {})]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="vlprune-example",
        description="Patch a LLaVA-1.5-shaped model (random weights, built locally) with each pruning method; "
        "print visual tokens, LM sequence length and prefill latency per method and ratio.",
    )
    ap.add_argument("--methods", default=None,
                    help="comma-separated method names (default: every registered method)")
    ap.add_argument("--ratios", type=parse_ratios, default=parse_ratios(DEFAULT_RATIOS),
                    help=f"comma-separated reduction ratios, fraction of visual tokens removed (default: {DEFAULT_RATIOS})")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    ap.add_argument("--repeats", type=int, default=3, help="timed forward passes per setting; the median is shown (default: 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    args = ap.parse_args(argv)

    registered = vlprune.methods()
    names = list(registered) if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in registered]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(registered)}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if not args.ratios:
        ap.error("--ratios needs at least one ratio")
    n_patches = (IMAGE_SIZE // PATCH) ** 2
    for ratio in args.ratios:
        try:
            Budget(ratio=ratio).tokens_for(n_patches)
        except vlprune.VlpruneError as err:
            ap.error(f"--ratios: {err}")
    device = torch.device(args.device)

    model = build_model(args.seed).to(device)
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    ids = prompt_ids(n_patches).to(device)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixel_values(synthetic_image()).to(device),
    }

    print("vlprune example: LLaVA-1.5-shaped LlavaForConditionalGeneration built from configs, RANDOM WEIGHTS.")
    print("  The numbers show token counts and prefill latency only; random weights say nothing about accuracy.")
    print(f"  vision: CLIP {vcfg.image_size}px / {vcfg.patch_size}px patches = {n_patches} patch tokens, "
          f"{vcfg.num_hidden_layers} layers x {vcfg.hidden_size} wide; LM: Llama {tcfg.num_hidden_layers} layers x "
          f"{tcfg.hidden_size} wide; prompt {ids.shape[1]} tokens")
    print(f"  machine: {machine(device)}")
    print(f"  prefill = median of {args.repeats} forward pass(es) after one warm-up, under torch.inference_mode; "
          "LM seq = positions in the output logits")
    print()

    base_ms, _, any_noisy, base_out = timed_prefill(model, inputs, args.repeats, device)
    base_logits = base_out.logits
    star = {True: "*", False: ""}
    rows = [("(unpatched)", "-", f"{n_patches}", str(ids.shape[1]), f"{base_ms:.1f}{star[any_noisy]}", "", "", "")]
    failures = []
    skipped = {}  # method -> why this model cannot take it
    for name in names:
        for label, budget in budgets(name, args.ratios):
            try:
                handle = vlprune.patch(model, name, **budget)
            except vlprune.VlpruneError as err:  # e.g. a stage this model's patcher does not serve
                skipped[name] = str(err)
                rows.append((name, "-", "-", "-", "-", "-", "-", "skipped (see below)"))
                break
            with handle:
                ms, unpruned_ms, noisy, out = timed_prefill(model, inputs, args.repeats, device, handle)
                any_noisy |= noisy
                rec = handle.last[0] if handle.last else None
            note = ""
            if rec is not None and rec.after == rec.before:  # nothing pruned: must be the unpatched computation, bit for bit
                same = torch.equal(out.logits, base_logits)
                note = "logits bit-identical" if same else "LOGITS DIFFER"
                if not same:
                    failures.append(f"{name} ratio {label}: nothing pruned, yet logits differ from the unpatched model")
            tokens = "-" if rec is None else f"{rec.before}->{rec.after}"
            rows.append((name, label, tokens, str(out.logits.shape[1]),
                         f"{ms:.1f}{star[noisy]}", f"{unpruned_ms:.1f}", f"{unpruned_ms / ms:.2f}x", note))

    header = ("method", "ratio", "visual tokens", "LM seq", "prefill ms", "unpruned ms", "speed-up", "check")
    table = [header] + rows
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("  (unpruned ms: the same model with the patch disabled, timed alternately with the pruned runs; "
          "speed-up = unpruned / pruned)")
    for name, why in skipped.items():
        print(f"  {name} skipped: {why}")
    if any_noisy:
        print(f"  * noisy: the timed runs of this setting (pruned or unpruned) differed by more than {NOISY}x; "
              "something else was probably competing for the machine. Rerun on an idle machine, or with more "
              "--repeats, for stable timings.")
    print()

    gen_ratio = max(args.ratios)
    print(f"generate(max_new_tokens=8, do_sample=False) at ratio {gen_ratio:g} (unbudgeted methods: their own): "
          f"output must start with the {ids.shape[1]} prompt ids")
    width = max(len(n) for n in names)
    for name in (n for n in names if n not in skipped):
        budget = budgets(name, [gen_ratio])[0][1]
        with vlprune.pruned(model, name, **budget) as handle, torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            rec = handle.last[0] if handle.last else None
        starts = out.shape[1] > ids.shape[1] and torch.equal(out[:, : ids.shape[1]], ids)
        if not starts:
            failures.append(f"{name}: generate output does not start with the prompt ids")
        new = out[0, ids.shape[1]:].tolist()
        tokens = "-" if rec is None else f"{rec.before}->{rec.after}"
        print(f"  {name:<{width}} visual {tokens}  output {out.shape[1]} ids = prompt + {len(new)} new "
              f"{new}  starts with prompt: {'yes' if starts else 'NO'}")

    with torch.inference_mode():
        restored = torch.equal(model(**inputs).logits, base_logits)
    print(f"\nafter every handle.remove(): logits bit-identical to the unpatched model: {'yes' if restored else 'NO'}")
    if not restored:
        failures.append("the model differs from the unpatched model after remove()")

    print()
    if failures:
        print("FAILED checks:\n  " + "\n  ".join(failures))
        return 1
    print("All checks passed (ratio 0 and remove() are the identity; generate returns prompt ids + new ids).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
