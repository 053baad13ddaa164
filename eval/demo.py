"""``vlprune-demo``: a Gradio page that answers one question about one image unpruned and under each chosen
pruning method, side by side, and shows which patches every method kept.

Three parts, each usable without the others:

- :func:`overlay` / :func:`panels_for`: pure functions from (image, which patches were kept on which grid)
  to a picture with the kept patches bright and the rest dimmed. A LLaVA-1.5 record is one square grid
  over the part of the image the processor keeps (centre crop or padding); a LLaVA-NeXT record is two
  panels, the base view and the unpadded high-res grid the crops form; a Qwen2.5-VL record is the merged
  2x2 grid (``image_grid_thw`` / 2). Each panel is drawn on the grid's own aspect (one square cell per
  token), so what is shown is what the model saw.
- :class:`Engine`: the model, its processor and **one lock**. A patch lives on the model object
  (``vlprune.patch`` replaces any earlier one), so two requests patching one shared model at the same
  time would run each other's method and budget. Every request therefore holds the lock from its
  unpruned run through its last method's ``remove()``; requests wait for each other instead of mixing.
  The lock is in the engine, not in Gradio's queue settings, so it holds for every caller (the page, the
  API, several events, any ``concurrency_limit``). Timings are taken inside the lock, undisturbed by
  other requests on the model.
- :func:`build_app` / :func:`main`: the page and its named API endpoint ``/compare``. Bad input (not an
  image, too large, empty question, budget out of range, unknown method) comes back as a message in the
  page's status box, never as a stack trace.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vlprune
from vlprune.registry import get_method, get_patcher

log = logging.getLogger("vlprune.demo")

MAX_BYTES = 20 * 1024 * 1024  # an upload larger than this is refused before it is decoded
MAX_PIXELS = 25_000_000  # width x height; also stops decompression bombs (PIL reads the size from the header)
MAX_QUESTION = 500  # characters
RATIO_MAX = 0.99  # the slider's top: keep at least 1 % of the tokens
DEFAULT_METHODS = ("fastervlm", "uniform")
NOISY = 1.5  # slowest / fastest timed pass of one setting above this: something else competed for the device
PANEL_PX = 448  # the longer side of each drawn grid panel
SAMPLES_DIR = "samples"  # under the package's assets: small synthetic scenes for the embedded model


class DemoInputError(ValueError):
    """Input the user can fix; its message is shown in the page as it is."""


# -- overlays: pure functions -------------------------------------------------------------------------
@dataclass(frozen=True)
class Panel:
    """One token grid of one image: ``grid`` (rows, cols), the ``kept`` raster indices, and ``box`` - the
    region (x0, y0, x1, y1) of the source image, in pixels, that the grid covers (it may reach outside the
    image where the processor pads; that part is drawn black)."""

    grid: tuple[int, int]
    kept: tuple[int, ...]
    box: tuple[float, float, float, float]
    label: str = ""


def keep_mask(grid: tuple[int, int], kept) -> np.ndarray:
    """(rows, cols) bool: True where a token was kept. Refuses indices outside the grid, which would mean
    the panel was built on the wrong grid."""
    rows, cols = grid
    mask = np.zeros(rows * cols, dtype=bool)
    kept = np.asarray(list(kept), dtype=np.int64)
    if kept.size and (kept.min() < 0 or kept.max() >= rows * cols):
        raise ValueError(f"kept index out of range for a {rows}x{cols} grid: {kept.min()}..{kept.max()}")
    mask[kept] = True
    return mask.reshape(rows, cols)


def overlay(image: Image.Image, panels, dim: float = 0.3, gap: int = 8, panel_px: int = PANEL_PX) -> Image.Image:
    """The panels side by side: each shows its ``box`` of ``image`` resized to the grid (one square cell
    per token, ``ceil(panel_px / max(rows, cols))`` pixels wide), kept cells unchanged and the others
    multiplied by ``dim``. Panels of different heights are top-aligned on black."""
    if not panels:
        raise ValueError("overlay needs at least one panel")
    rgb = image.convert("RGB")
    drawn = []
    for p in panels:
        rows, cols = p.grid
        cell = max(1, math.ceil(panel_px / max(rows, cols)))
        region = rgb.crop(tuple(round(v) for v in p.box)).resize((cols * cell, rows * cell), Image.BICUBIC)
        pixels = np.asarray(region, dtype=np.float32)
        bright = np.kron(keep_mask(p.grid, p.kept), np.ones((cell, cell), dtype=bool))[..., None]
        drawn.append(np.where(bright, pixels, pixels * dim).round().astype(np.uint8))
    height = max(d.shape[0] for d in drawn)
    width = sum(d.shape[1] for d in drawn) + gap * (len(drawn) - 1)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    x = 0
    for d in drawn:
        canvas[: d.shape[0], x : x + d.shape[1]] = d
        x += d.shape[1] + gap
    return Image.fromarray(canvas)


def llava_box(size: tuple[int, int], image_processor) -> tuple[float, float, float, float]:
    """The region of a (width, height) image a LLaVA-1.5 processor turns into its square grid: the padded
    square (``do_pad``: the original LLaVA's expand-to-square), the centre square (``do_center_crop`` after
    a shortest-edge resize, as llava-hf's CLIP processor), or the whole image squashed (a fixed-size
    resize, as the embedded model's)."""
    w, h = size
    if getattr(image_processor, "do_pad", False):
        side = max(w, h)
    elif getattr(image_processor, "do_center_crop", False):
        side = min(w, h)
    else:
        return (0.0, 0.0, float(w), float(h))
    return ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)


def panels_for(record, size: tuple[int, int], image_processor=None, grid_thw=None) -> list[Panel]:
    """The panels of one :class:`~vlprune.ImageRecord` of an image of ``size`` (width, height).

    - LLaVA-NeXT (``NextImageRecord``, which carries ``grids``): the base view (the whole image on an
      s x s grid) and the unpadded high-res grid (H x W over the whole image), each with its kept tokens.
    - Qwen2.5-VL: pass ``grid_thw`` (the image's row of ``image_grid_thw``, in patches); the kept indices
      are on the merged (h/2) x (w/2) grid over the whole (aspect-preserving resized) image.
    - LLaVA-1.5: a square grid of ``record.before`` tokens over :func:`llava_box`.
    """
    kept = tuple(int(i) for i in record.kept.tolist())
    whole = (0.0, 0.0, float(size[0]), float(size[1]))
    grids = getattr(record, "grids", ())
    if grids:
        (s, _), (high_h, high_w) = grids
        panels = [Panel((s, s), tuple(i for i in kept if i < s * s), whole, "base view")]
        if high_h * high_w:
            panels.append(Panel((high_h, high_w), tuple(i - s * s for i in kept if i >= s * s), whole, "high-res crops"))
        return panels
    if grid_thw is not None:
        _t, h, w = (int(v) for v in grid_thw)
        return [Panel((h // 2, w // 2), kept, whole, "merged 2x2 grid")]
    side = math.isqrt(record.before)
    if side * side != record.before:
        raise ValueError(f"cannot lay {record.before} tokens out on a square grid; pass the model's grid")
    return [Panel((side, side), kept, llava_box(size, image_processor), "patch grid")]


# -- the model, shared between requests ------------------------------------------------------------------
@dataclass
class Run:
    """One setting's result: the unpruned model (``method=None``) or one method."""

    method: str | None
    answer: str = ""
    visual: tuple[int, int] | None = None  # visual tokens (before, after) of the image
    lm_tokens: int | None = None  # positions the LM prefilled (prompt text + visual tokens)
    prefill_ms: float | None = None
    speedup: float | None = None
    noisy: bool = False  # its timed passes differed by more than NOISY x
    error: str | None = None
    panels: list[Panel] = field(default_factory=list)


@dataclass
class Comparison:
    runs: list[Run]
    budget: dict
    waited_s: float  # time spent waiting for the model lock (another request held it)
    model_window: tuple[float, float]  # wall-clock (time.time()) start and end of this request's turn on the model
    repeats: int = 1
    device: str = "cpu"


class Engine:
    """A model + processor that many requests share. ``compare`` holds ``self.lock`` for its whole turn
    (see the module docstring); ``serialize=False`` exists only so a test can show what the lock prevents."""

    def __init__(self, model, processor, *, chat_template: bool = True, max_new_tokens: int = 32,
                 repeats: int = 3, serialize: bool = True, name: str = ""):
        self.model, self.processor = model.eval(), processor
        self.chat_template, self.max_new_tokens, self.repeats = chat_template, max_new_tokens, repeats
        self.lock = threading.Lock() if serialize else contextlib.nullcontext()
        self.name = name or type(model).__name__
        self.device = next(model.parameters()).device
        self.is_qwen = "qwen" in type(model).__name__.lower()

    @classmethod
    def embedded(cls, device: str | None = None, **kw) -> Engine:
        """The offline default: the embedded model with its own prompt format (no chat template)."""
        model, processor = vlprune.load_embedded()
        model = model.to(device or _default_device())
        kw.setdefault("max_new_tokens", int(model.generation_config.max_new_tokens or 4))
        return cls(model, processor, chat_template=False, name="embedded (DINOv2-small LLaVA, synthetic scenes)", **kw)

    @classmethod
    def from_pretrained(cls, path: str, device: str | None = None, dtype: str = "auto", **kw) -> Engine:
        """A Hugging Face checkpoint (path or hub id) of a family vlprune patches: LLaVA-1.5, LLaVA-NeXT,
        Qwen2.5-VL. Prompts go through the processor's chat template."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        # device_map puts the weights straight on the device (a 7B model need not pass through CPU memory)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, device_map=device or _default_device())
        get_patcher(model)  # fail at start-up, with the supported classes, not per request
        return cls(model, AutoProcessor.from_pretrained(path), name=path, **kw)

    def prompt(self, question: str) -> str:
        if not self.chat_template:
            from vlprune.embedded.scenes import prompt

            return prompt(question)
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

    def inputs(self, image: Image.Image, question: str):
        batch = self.processor(images=[image], text=[self.prompt(question)], return_tensors="pt")
        return batch.to(self.device, dtype=self.model.dtype)  # casts only floating tensors (pixel_values)

    def visual_tokens(self, inputs) -> int:
        """Image placeholders in the prompt: the visual tokens of the image (LLaVA-NeXT: plus newlines)."""
        return int((inputs["input_ids"] == self.model.config.image_token_id).sum())

    def compare(self, image: Image.Image, inputs, methods, budget: dict) -> Comparison:
        """The unpruned answer and each method's on ``inputs`` (from :meth:`inputs`), with token counts,
        prefill times and overlays. ``budget`` is ``{"ratio": r}`` or ``{"keep": k}`` (methods that choose
        their own budget ignore it)."""
        asked = time.time()
        with self.lock:
            start = time.time()
            runs = [self._run(None, inputs, {}, image)] + [self._run(m, inputs, budget, image) for m in methods]
            end = time.time()
        for run in runs[1:]:
            if run.prefill_ms and runs[0].prefill_ms:
                run.speedup = runs[0].prefill_ms / run.prefill_ms
        return Comparison(runs, budget, start - asked, (start, end), self.repeats, str(self.device))

    def _run(self, method, inputs, budget, image) -> Run:
        run = Run(method)
        try:
            if method is None:
                self._measure(run, inputs)
                return run
            kw = budget if get_method(method).budgeted else {}
            with vlprune.pruned(self.model, method, **kw) as handle:
                self._measure(run, inputs)
                records = list(handle.last)
                if not handle.active:  # only when something patched this model meanwhile (no lock)
                    raise RuntimeError("the patch was replaced by another request during this run")
            if not records:
                raise RuntimeError(f"method {method!r} left no record of the image")
            rec = records[0]
            run.visual = (int(rec.before), int(rec.after))
            grid = inputs["image_grid_thw"][0].tolist() if self.is_qwen else None
            run.panels = panels_for(rec, image.size, getattr(self.processor, "image_processor", None), grid)
        except vlprune.VlpruneError as e:
            run.error = str(e)
        except Exception as e:  # one failing method must not take the others' answers down
            log.exception("method %s failed", method)
            run.error = f"internal error ({type(e).__name__}): {e}"
        return run

    @torch.inference_mode()
    def _measure(self, run: Run, inputs) -> None:
        """Greedy answer, then the prefill time: the median of ``repeats`` forward passes over the prompt
        (``generate`` already warmed this setting up)."""
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        run.answer = self.processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        times = []
        for _ in range(max(1, self.repeats)):
            _sync(self.device)
            t = time.perf_counter()
            logits = self.model(**inputs).logits
            _sync(self.device)
            times.append(time.perf_counter() - t)
        run.lm_tokens = int(logits.shape[1])
        run.prefill_ms = 1000 * statistics.median(times)
        run.noisy = max(times) > NOISY * min(times)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: torch.device) -> None:
    """Wait for queued kernels so the clock measures the work, on any accelerator torch knows."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()


# -- input checks: every message is meant for the person at the page -----------------------------------
def load_image(path) -> Image.Image:
    if not path:
        raise DemoInputError("Upload an image (or pick one of the samples below).")
    path = Path(path)
    if not path.is_file():
        raise DemoInputError("The uploaded image could not be read; upload it again.")
    if path.stat().st_size > MAX_BYTES:
        raise DemoInputError(f"The image file is {path.stat().st_size / 2**20:.1f} MB; the limit is {MAX_BYTES // 2**20} MB.")
    try:
        with Image.open(path) as img:
            w, h = img.size  # from the header: nothing decoded yet
            if w * h > MAX_PIXELS:
                raise DemoInputError(f"The image is {w}x{h} pixels ({w * h / 1e6:.1f} MP); the limit is "
                                     f"{MAX_PIXELS / 1e6:.0f} MP. Downscale it and upload again.")
            img.load()
            return img.convert("RGB")
    except DemoInputError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DemoInputError(f"That file is not an image this demo can read (PNG, JPEG, WebP, ...): {type(e).__name__}.") from e


def check_question(question) -> str:
    question = (question or "").strip()
    if not question:
        raise DemoInputError("Type a question about the image.")
    if len(question) > MAX_QUESTION:
        raise DemoInputError(f"The question is {len(question)} characters long; the limit is {MAX_QUESTION}.")
    return question


def check_methods(methods) -> list[str]:
    if isinstance(methods, str):  # API callers may send "a,b"
        methods = [m.strip() for m in methods.split(",")]
    methods = [m for m in (methods or []) if m]
    if not methods:
        raise DemoInputError("Choose at least one pruning method.")
    known = vlprune.methods()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise DemoInputError(f"Unknown method(s): {', '.join(map(str, unknown))}. Known: {', '.join(known)}.")
    return list(dict.fromkeys(methods))


def check_budget(mode, ratio, keep, n_visual: int) -> dict:
    """``{"ratio": r}`` or ``{"keep": k}`` from the page's controls; ``n_visual`` bounds ``keep``."""
    if mode == "ratio":
        if not isinstance(ratio, (int, float)) or not 0 <= ratio <= RATIO_MAX:
            raise DemoInputError(f"The reduction ratio must be between 0 and {RATIO_MAX} (the fraction of visual "
                                 f"tokens removed); got {ratio!r}.")
        return {"ratio": float(ratio)}
    if mode == "keep":
        if not isinstance(keep, (int, float)) or keep != int(keep) or not 1 <= keep <= n_visual:
            raise DemoInputError(f"Tokens to keep must be a whole number between 1 and {n_visual} (this image's "
                                 f"visual tokens); got {keep!r}.")
        return {"keep": int(keep)}
    raise DemoInputError(f"Budget must be given as 'ratio' or 'keep'; got {mode!r}.")


# -- the page ----------------------------------------------------------------------------------------------
TABLE_HEAD = "| setting | answer | visual tokens | LM tokens | prefill ms | speed-up |\n|---|---|---|---|---|---|\n"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(comparison: Comparison, image: Image.Image):
    """(status, markdown table, gallery items, details) of a finished comparison."""
    runs = comparison.runs
    n = next((r.visual[0] for r in runs if r.visual), None)
    rows = []
    for r in runs:
        name = "unpruned" if r.method is None else r.method
        if r.error:
            rows.append(f"| {name} | error: {_cell(r.error)} | | | | |")
            continue
        tokens = (n or "") if r.method is None else f"{r.visual[0]} → {r.visual[1]}"
        speed = "1.00×" if r.method is None else f"{r.speedup:.2f}×" if r.speedup else ""
        rows.append(f"| {name} | **{_cell(r.answer) or '(empty)'}** | {tokens} | {r.lm_tokens} | {r.prefill_ms:.1f}{'*' if r.noisy else ''} | {speed} |")
    gallery = [(image, f"unpruned: {runs[0].answer or runs[0].error}")]
    for r in runs[1:]:
        if r.panels:
            parts = " | ".join(p.label for p in r.panels)
            gallery.append((overlay(image, r.panels), f"{r.method}: {r.answer} ({r.visual[1]}/{r.visual[0]} tokens kept; {parts})"))
    note = (f"\n\nprefill: median of {comparison.repeats} forward pass(es) over the prompt on {comparison.device}, "
            f"after `generate` warmed the setting up; speed-up = unpruned / pruned prefill.")
    if any(r.noisy for r in runs):
        note += f" \\* noisy: its timed passes differed by more than {NOISY}x (another process competed for the device)."
    budget = ", ".join(f"{k}={v}" for k, v in comparison.budget.items())
    failed = [r.method or "unpruned" for r in runs if r.error]
    status = f"Done: {len(runs) - 1} method(s) at {budget}" + (f"; failed: {', '.join(failed)}" if failed else "") + \
        (f" (waited {comparison.waited_s:.1f} s for another request)" if comparison.waited_s > 0.05 else "") + "."
    details = {
        "budget": comparison.budget,
        "waited_s": round(comparison.waited_s, 3),
        "model_window": list(comparison.model_window),
        "runs": [{"method": r.method, "answer": r.answer, "error": r.error,
                  "visual_before": r.visual[0] if r.visual else n, "visual_after": r.visual[1] if r.visual else n,
                  "lm_tokens": r.lm_tokens, "prefill_ms": r.prefill_ms, "speedup": r.speedup, "noisy": r.noisy,
                  "kept": [list(p.kept) for p in r.panels], "grids": [list(p.grid) for p in r.panels]} for r in runs],
    }
    return status, TABLE_HEAD + "\n".join(rows) + note, gallery, details


def handle_request(engine: Engine, image_path, question, methods, mode, ratio, keep):
    """The ``/compare`` endpoint: checks the input, runs the comparison, and turns every failure into a
    message in the status box (the outputs are cleared, so no stale result sits next to an error)."""
    try:
        image = load_image(image_path)
        question = check_question(question)
        methods = check_methods(methods)
        inputs = engine.inputs(image, question)
        budget = check_budget(mode, ratio, keep, engine.visual_tokens(inputs))
        return render(engine.compare(image, inputs, methods, budget), image)
    except DemoInputError as e:
        return f"**Error:** {e}", "", [], {"error": str(e)}
    except Exception as e:  # the page gets one line; the server log gets the traceback
        log.exception("request failed")
        return f"**Internal error** ({type(e).__name__}): {e}. See the server log.", "", [], {"error": str(e)}


def samples_dir() -> Path:
    from vlprune.embedded import asset_dir

    return asset_dir().parent / SAMPLES_DIR


def sample_examples() -> list[list[str]]:
    """[[image path, question], ...] of the shipped samples (``assets/samples/samples.json``)."""
    index = samples_dir() / "samples.json"
    if not index.is_file():
        return []
    return [[str(samples_dir() / s["file"]), s["question"]] for s in json.loads(index.read_text())]


def _image_component(**kw):
    """A ``gr.Image`` whose server side passes the upload's path through without opening it: the stock
    preprocess decodes the upload before the handler runs, so a broken file would surface as Gradio's
    generic error instead of :func:`load_image`'s message. Overridden on the instance, not by a subclass:
    Gradio writes a ``.pyi`` file next to the module of every Component subclass."""
    import gradio as gr

    image = gr.Image(type="filepath", **kw)
    image.preprocess = lambda payload: None if payload is None else payload.path
    return image


def build_app(engine: Engine, concurrency: int = 4):
    """The page. ``concurrency`` requests may be in flight at once (decoding, checks, drawing); the
    engine's lock still gives the model to one at a time."""
    import gradio as gr

    names = list(vlprune.methods())
    with gr.Blocks(title="vlprune demo", analytics_enabled=False) as app:
        gr.Markdown(f"# vlprune demo\nOne image, one question: the unpruned answer next to each pruning method's, "
                    f"with the visual tokens each method kept (bright) and dropped (dimmed). Model: `{engine.name}`.")
        with gr.Row():
            with gr.Column(scale=1):
                image = _image_component(label="Image", sources=["upload"], elem_id="image", height=300)
                question = gr.Textbox(label="Question", elem_id="question", max_lines=3)
                methods = gr.CheckboxGroup(names, value=[m for m in DEFAULT_METHODS if m in names],
                                           label="Methods", elem_id="methods")
                mode = gr.Radio(["ratio", "keep"], value="ratio", label="Budget given as", elem_id="mode")
                ratio = gr.Slider(0, RATIO_MAX, value=0.75, step=0.01, label="Reduction ratio (fraction of visual tokens removed)",
                                  elem_id="ratio")
                keep = gr.Number(value=64, precision=0, label="Tokens to keep per image", elem_id="keep")
                run = gr.Button("Compare", variant="primary", elem_id="run")
                if examples := sample_examples():
                    gr.Examples(examples, inputs=[image, question], label="Samples (synthetic scenes for the embedded model)")
            with gr.Column(scale=2):
                status = gr.Markdown("Upload an image, ask a question, press **Compare**.", elem_id="status")
                table = gr.Markdown(elem_id="table")
                gallery = gr.Gallery(label="Kept patches (bright) per method", elem_id="gallery", columns=3,
                                     object_fit="contain", height=300)
                with gr.Accordion("Details (JSON)", open=False):
                    details = gr.JSON(elem_id="details")
        run.click(lambda *a: handle_request(engine, *a), [image, question, methods, mode, ratio, keep],
                  [status, table, gallery, details], api_name="compare", concurrency_limit=concurrency,
                  show_progress="minimal")  # a small timer: a full-page animation costs CPU the timings share
    return app


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlprune-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF path or hub id (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL); default: the embedded model")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="for --model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also serve through a public Gradio share link")
    p.add_argument("--max-new-tokens", type=int, help="answer length (default: 4 for the embedded model, else 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed prefill passes per setting (median)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (the model runs one at a time)")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO)
    kw = {"repeats": args.repeats} | ({"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {})
    try:
        engine = (Engine.from_pretrained(args.model, args.device, args.dtype, **kw) if args.model
                  else Engine.embedded(args.device, **kw))
    except (OSError, vlprune.VlpruneError) as e:
        raise SystemExit(f"vlprune-demo: cannot load the model: {e}")
    build_app(engine, args.concurrency).launch(server_name=args.host, server_port=args.port, share=args.share,
                                               max_file_size=2 * MAX_BYTES)


if __name__ == "__main__":
    main()
