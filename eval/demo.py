"""``vlprune-demo``: a Gradio page that answers one question about one image unpruned and under each chosen
pruning method, side by side, and shows which patches every method kept.

Three parts, each usable without the others:

- :func:`overlay` / :func:`panels_for`: pure functions from (image, which patches were kept on which grid)
  to a picture with the kept patches bright and the rest dimmed. A merging method's output token (a row of
  the record's ``sources`` with several weights: pool, prumerge_plus, visionzip's contextual tokens) is
  drawn as the region it averages, tinted in its own colour and outlined, so it does not read as one kept
  patch. A LLaVA-1.5 record is one square grid over the part of the image the processor keeps (centre
  crop or padding); a LLaVA-NeXT record is two panels, the base view and the unpadded high-res grid the
  crops form; a Qwen2.5-VL record is the merged 2x2 grid (``image_grid_thw`` / 2). Each panel is drawn on
  the grid's own aspect (one square cell per token), so what is shown is what the model saw.
- :class:`Engine`: the model, its processor and **one lock**. A patch lives on the model object
  (``vlprune.patch`` replaces any earlier one), so two requests patching one shared model at the same
  time would run each other's method and budget. Every request therefore holds the lock from its
  unpruned run through its last method's ``remove()``; requests wait for each other instead of mixing.
  The lock is in the engine, not in Gradio's queue settings, so it holds for every caller (the page, the
  API, several events, any ``concurrency_limit``). Timings are taken inside the lock, undisturbed by
  other requests on the model.
- :func:`build_app` / :func:`launch` / :func:`main`: the page and its named API endpoint ``/compare``,
  which returns the table both as Markdown and as JSON. A sample fills in its expected answer and each
  answer is marked against it (:func:`is_correct`). Bad input (not an image, too large, empty question,
  budget out of range, unknown method) comes back as a message in the page's status box, never as a
  stack trace.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
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
    image where the processor pads; that part is drawn black). ``merged``: for a merging method, one tuple
    per output token that averages several patches, the cells it stands for (its own kept cell included)."""

    grid: tuple[int, int]
    kept: tuple[int, ...]
    box: tuple[float, float, float, float]
    label: str = ""
    merged: tuple[tuple[int, ...], ...] = ()


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


def merge_colour(i: int) -> np.ndarray:
    """A bright colour for merged region ``i``: hues a golden-ratio step apart, so neighbouring regions
    (consecutive in raster order) never share a colour."""
    import colorsys

    return np.array(colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0), dtype=np.float32) * 255


def _draw(region: np.ndarray, p: Panel, cell: int, dim: float, tint: float) -> np.ndarray:
    """One panel: kept cells as they are, merged regions tinted in their colour and outlined in white
    (their own kept cell left untinted), everything else multiplied by ``dim``."""
    rows, cols = p.grid
    owner = np.full(rows * cols, -1, dtype=np.int64)  # which merged region each cell belongs to
    for g, cells in enumerate(p.merged):
        owner[keep_mask(p.grid, cells).reshape(-1)] = g
    owner = owner.reshape(rows, cols)
    kept = keep_mask(p.grid, p.kept)

    def px(cells: np.ndarray, template=None) -> np.ndarray:  # a cell-level array at pixel resolution
        return np.kron(cells, np.ones((cell, cell), dtype=cells.dtype) if template is None else template)

    out = np.where(px(kept)[..., None], region, region * dim)
    if not p.merged:
        return out
    colours = np.stack([merge_colour(g) for g in range(len(p.merged))])
    tinted = px((owner >= 0) & ~kept)[..., None]
    colour = np.repeat(np.repeat(colours[owner.clip(0)], cell, axis=0), cell, axis=1)
    out = np.where(tinted, region * (1 - tint) + colour * tint, out)
    line = max(1, cell // 9)
    pad = np.pad(owner, 1, constant_values=-1)
    border = np.zeros(out.shape[:2], dtype=bool)
    for neighbour, side in ((pad[:-2, 1:-1], np.s_[:line, :]), (pad[2:, 1:-1], np.s_[-line:, :]),
                            (pad[1:-1, :-2], np.s_[:, :line]), (pad[1:-1, 2:], np.s_[:, -line:])):
        template = np.zeros((cell, cell), dtype=bool)
        template[side] = True  # the cell's edge towards that neighbour
        border |= px((owner >= 0) & (neighbour != owner), template)
    out[border] = 255
    return out


def overlay(image: Image.Image, panels, dim: float = 0.3, gap: int = 8, panel_px: int = PANEL_PX,
            tint: float = 0.4) -> Image.Image:
    """The panels side by side: each shows its ``box`` of ``image`` resized to the grid (one square cell
    per token, ``ceil(panel_px / max(rows, cols))`` pixels wide), kept cells unchanged, the others
    multiplied by ``dim``; each merged region (``Panel.merged``) is blended ``tint`` of the way towards
    its own colour and outlined, so one output token reads as the area it averages. Panels of different
    heights are top-aligned on black."""
    if not panels:
        raise ValueError("overlay needs at least one panel")
    rgb = image.convert("RGB")
    drawn = []
    for p in panels:
        rows, cols = p.grid
        cell = max(1, math.ceil(panel_px / max(rows, cols)))
        region = rgb.crop(tuple(round(v) for v in p.box)).resize((cols * cell, rows * cell), Image.BICUBIC)
        drawn.append(_draw(np.asarray(region, dtype=np.float32), p, cell, dim, tint).round().astype(np.uint8))
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


def merge_groups(record) -> list[tuple[int, ...]]:
    """For each output token of ``record`` that averages more than one input token (a row of
    ``record.sources`` with several non-zero weights: pool, prumerge_plus, visionzip's contextual tokens),
    the input tokens it stands for, in the record's index space. A token several outputs draw on goes to
    the one that weighs it most, so the regions do not overlap; each output keeps its own kept token."""
    if getattr(record, "sources", None) is None:
        return []
    weights = record.sources.detach().float().cpu().numpy()  # (after, before)
    merging = np.flatnonzero((weights > 0).sum(axis=1) > 1)
    if not merging.size:
        return []
    owner = np.where((weights > 0).any(axis=0), weights.argmax(axis=0), -1)
    kept = record.kept.cpu().numpy()
    owner[kept] = np.arange(len(kept))
    return [tuple(int(i) for i in np.flatnonzero(owner == row)) for row in merging]


def panels_for(record, size: tuple[int, int], image_processor=None, grid_thw=None) -> list[Panel]:
    """The panels of one :class:`~vlprune.ImageRecord` of an image of ``size`` (width, height), with the
    record's merged regions (:func:`merge_groups`) on the panel they lie in.

    - LLaVA-NeXT (``NextImageRecord``, which carries ``grids``): the base view (the whole image on an
      s x s grid) and the unpadded high-res grid (H x W over the whole image), each with its kept tokens.
    - Qwen2.5-VL: pass ``grid_thw`` (the image's row of ``image_grid_thw``, in patches); the kept indices
      are on the merged (h/2) x (w/2) grid over the whole (aspect-preserving resized) image.
    - LLaVA-1.5: a square grid of ``record.before`` tokens over :func:`llava_box`.
    """
    kept = tuple(int(i) for i in record.kept.tolist())
    groups = merge_groups(record)
    whole = (0.0, 0.0, float(size[0]), float(size[1]))

    def part(lo: int, hi: int) -> dict:  # the kept tokens and merged regions in [lo, hi), panel-local
        inside = [tuple(i - lo for i in g if lo <= i < hi) for g in groups]
        return {"kept": tuple(i - lo for i in kept if lo <= i < hi), "merged": tuple(g for g in inside if g)}

    grids = getattr(record, "grids", ())
    if grids:
        (s, _), (high_h, high_w) = grids
        panels = [Panel((s, s), box=whole, label="base view", **part(0, s * s))]
        if high_h * high_w:
            panels.append(Panel((high_h, high_w), box=whole, label="high-res crops", **part(s * s, s * s + high_h * high_w)))
        return panels
    if grid_thw is not None:
        _t, h, w = (int(v) for v in grid_thw)
        return [Panel((h // 2, w // 2), box=whole, label="merged 2x2 grid", **part(0, record.before))]
    side = math.isqrt(record.before)
    if side * side != record.before:
        raise ValueError(f"cannot lay {record.before} tokens out on a square grid; pass the model's grid")
    return [Panel((side, side), box=llava_box(size, image_processor), label="patch grid", **part(0, record.before))]


# -- the model, shared between requests ------------------------------------------------------------------
@dataclass
class Run:
    """One setting's result: the unpruned model (``method=None``) or one method."""

    method: str | None
    answer: str = ""
    visual: tuple[int, int] | None = None  # visual tokens (before, after) of the image
    layer: int | None = None  # methods inside the LM: the decoder layer from which only ``after`` remain
    counts: dict[int, int] | None = None  # methods that drop at several LM layers: tokens from each on
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
            run.visual, run.layer, run.counts = (int(rec.before), int(rec.after)), rec.layer, rec.counts
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
TABLE_HEAD = ("| setting | answer | visual<br>tokens | LM<br>tokens | prefill<br>ms | speed-up |\n"
              "|---|---|---|---|---|---|\n")
MAX_EXPECTED = 100  # characters
SAMPLES_NOTE = ("Samples: synthetic scenes of the kind the embedded model was trained on, and two photographs "
                "(scikit-image's sample data, CC0). The embedded model has seen only synthetic scenes, so it "
                "answers photographs poorly; a Hugging Face checkpoint (`--model`) answers them.")
# Gradio's defaults cut gallery captions to one line ("28/256 tokens ke...") and let table cells break
# anywhere, mid-word, on a phone; these rules undo both and keep the page within a 420 px screen.
CSS = """
#table th, #table td:nth-child(3) { white-space: nowrap; }
#table th, #table td { overflow-wrap: normal; word-break: normal; hyphens: none; }
#table table { width: auto; max-width: 100%; }
#table .prose, #table > div { overflow-x: auto; }
#gallery .thumbnail-item { aspect-ratio: auto; height: auto; display: flex; flex-direction: column; }
#gallery .thumbnail-item > img { height: auto; }
#gallery .caption-label, #gallery .caption { position: static; max-width: none; white-space: normal;
  text-overflow: clip; overflow: visible; opacity: 1; border: none; border-radius: 0; text-align: left; }
#gallery .grid-container { grid-template-rows: none; grid-auto-rows: auto; }
#gallery .grid-wrap { height: auto !important; max-height: none; overflow-y: visible; }
@media (max-width: 600px) {
  #table th, #table td { padding: 3px 4px; font-size: 12px; }
  #table th:nth-child(4), #table td:nth-child(4) { display: none; }  /* LM tokens: in the JSON */
  .table-wrap th, .table-wrap td { padding: 4px; }
  #gallery .grid-container { grid-template-columns: repeat(2, minmax(0, 1fr)); }
}
"""


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", str(text).lower())


def is_correct(answer: str, expected: str) -> bool | None:
    """None without an expected answer. Otherwise whether the answer says it: its words contain the
    expected words in order ("orange" matches "orange" and "The cat is orange."), case and punctuation
    ignored, because hub models answer in sentences where the embedded model answers in one word."""
    want = _words(expected)
    if not want:
        return None
    got = _words(answer)
    return any(got[i:i + len(want)] == want for i in range(len(got) - len(want) + 1))


def method_summary(name: str) -> str:
    """A method's one-line description: its class's ``summary``, else the first line of its docstring."""
    cls = get_method(name)
    return cls.summary or (cls.__doc__ or "").strip().split("\n")[0]


def _mark(correct: bool | None) -> str:
    return {True: " ✓", False: " ✗", None: ""}[correct]


def _caption(r: Run, correct: bool | None) -> str:
    """A gallery caption: answer, its mark, and what the picture shows (merged regions say so)."""
    before, after = r.visual
    merged = sum(len(p.merged) for p in r.panels)
    shown = f"{after} of {before} tokens kept (bright)"
    if merged:
        shown += f"; {merged} of them each average a coloured, outlined region"
    return f"{r.method}: {r.answer or '(empty)'}{_mark(correct)} · {shown} · {' | '.join(p.label for p in r.panels)}"


def render(comparison: Comparison, image: Image.Image, expected: str = ""):
    """(status, markdown table, gallery items, result) of a finished comparison; ``result`` is the table as
    JSON (one entry per row, plus each overlay's grids, kept indices and merged regions) for API callers."""
    runs = comparison.runs
    n = next((r.visual[0] for r in runs if r.visual), None)
    correct = [None if r.error else is_correct(r.answer, expected) for r in runs]
    rows = []
    for r, ok in zip(runs, correct):
        name = "unpruned" if r.method is None else r.method
        if r.error:
            rows.append(f"| {name} | error: {_cell(r.error)} | | | | |")
            continue
        tokens = (n or "") if r.method is None else f"{r.visual[0]} → {r.visual[1]}"
        if r.counts:  # several drops inside the LM: each layer's count
            tokens = f"{r.visual[0]} → " + " → ".join(f"{c} (LM layer {k})" for k, c in r.counts.items())
        elif r.layer is not None:  # inside the LM: the earlier decoder layers saw every visual token
            tokens += f" from LM layer {r.layer}"
        speed = "1.00×" if r.method is None else f"{r.speedup:.2f}×" if r.speedup else ""
        rows.append(f"| {name} | **{_cell(r.answer) or '(empty)'}**{_mark(ok)} | {tokens} | {r.lm_tokens} | "
                    f"{r.prefill_ms:.1f}{'*' if r.noisy else ''} | {speed} |")
    head = f"Expected answer: **{_cell(expected.strip())}** (✓ the answer says it, ✗ it does not)\n\n" if expected.strip() else ""
    note = (f"\n\nprefill: median of {comparison.repeats} forward pass(es) over the prompt on {comparison.device}, "
            f"after `generate` warmed the setting up; speed-up = unpruned / pruned prefill.")
    if any(r.noisy for r in runs):
        note += f" \\* noisy: its timed passes differed by more than {NOISY}x (another process competed for the device)."
    note += "\n\n" + "\n".join(f"- **{r.method}**: {method_summary(r.method)}" for r in runs[1:])
    gallery = [(image, f"unpruned: {runs[0].error or (runs[0].answer or '(empty)') + _mark(correct[0])} · all {n or '?'} tokens")]
    gallery += [(overlay(image, r.panels), _caption(r, ok)) for r, ok in zip(runs[1:], correct[1:]) if r.panels]
    budget = ", ".join(f"{k}={v}" for k, v in comparison.budget.items())
    failed = [r.method or "unpruned" for r in runs if r.error]
    status = f"Done: {len(runs) - 1} method(s) at {budget}" + (f"; failed: {', '.join(failed)}" if failed else "") + \
        (f" (waited {comparison.waited_s:.1f} s for another request)" if comparison.waited_s > 0.05 else "") + "."
    result = {
        "budget": comparison.budget,
        "expected": expected.strip() or None,
        "waited_s": round(comparison.waited_s, 3),
        "model_window": list(comparison.model_window),
        "runs": [{"method": r.method, "summary": None if r.method is None else method_summary(r.method),
                  "answer": r.answer, "correct": ok, "error": r.error,
                  "visual_before": r.visual[0] if r.visual else n, "visual_after": r.visual[1] if r.visual else n,
                  "visual_from_layer": r.layer,
                  "visual_per_layer": None if not r.counts else {str(k): c for k, c in r.counts.items()},
                  "lm_tokens": r.lm_tokens, "prefill_ms": r.prefill_ms, "speedup": r.speedup, "noisy": r.noisy,
                  "grids": [list(p.grid) for p in r.panels], "kept": [list(p.kept) for p in r.panels],
                  "merged": [[list(g) for g in p.merged] for p in r.panels]} for r, ok in zip(runs, correct)],
    }
    return status, head + TABLE_HEAD + "\n".join(rows) + note, gallery, result


def check_expected(expected) -> str:
    expected = (expected or "").strip()
    if len(expected) > MAX_EXPECTED:
        raise DemoInputError(f"The expected answer is {len(expected)} characters long; the limit is {MAX_EXPECTED}.")
    return expected


def handle_request(engine: Engine, image_path, question, methods, mode, ratio, keep, expected=""):
    """The ``/compare`` endpoint: checks the input, runs the comparison, and turns every failure into a
    message in the status box (the outputs are cleared, so no stale result sits next to an error)."""
    try:
        image = load_image(image_path)
        question = check_question(question)
        methods = check_methods(methods)
        expected = check_expected(expected)
        inputs = engine.inputs(image, question)
        budget = check_budget(mode, ratio, keep, engine.visual_tokens(inputs))
        return render(engine.compare(image, inputs, methods, budget), image, expected)
    except DemoInputError as e:
        return f"**Error:** {e}", "", [], {"error": str(e)}
    except Exception as e:  # the page gets one line; the server log gets the traceback
        log.exception("request failed")
        return f"**Internal error** ({type(e).__name__}): {e}. See the server log.", "", [], {"error": str(e)}


def samples_dir() -> Path:
    from vlprune.embedded import asset_dir

    return asset_dir().parent / SAMPLES_DIR


def sample_examples() -> list[list[str]]:
    """[[image path, question, expected answer], ...] of the shipped samples (``assets/samples/samples.json``:
    a list of {"file", "question", "answer"}, optionally "source")."""
    index = samples_dir() / "samples.json"
    if not index.is_file():
        return []
    examples = []
    for i, s in enumerate(json.loads(index.read_text())):
        missing = {"file", "question", "answer"} - set(s)
        if missing:
            raise ValueError(f"{index}: sample {i} lacks {', '.join(sorted(missing))}")
        examples.append([str(samples_dir() / s["file"]), s["question"], s["answer"]])
    return examples


def _image_component(**kw):
    """A ``gr.Image`` whose server side passes the upload's path through without opening it: the stock
    preprocess decodes the upload before the handler runs, so a broken file would surface as Gradio's
    generic error instead of :func:`load_image`'s message. Overridden on the instance, not by a subclass:
    Gradio writes a ``.pyi`` file next to the module of every Component subclass."""
    import gradio as gr

    image = gr.Image(type="filepath", **kw)
    image.preprocess = lambda payload: None if payload is None else payload.path
    return image


def budget_controls(mode: str):
    """Only the control the chosen budget mode reads stays active; the other is greyed out."""
    import gradio as gr

    return gr.update(interactive=mode == "ratio"), gr.update(interactive=mode == "keep")


def build_app(engine: Engine, concurrency: int = 4):
    """The page. ``concurrency`` requests may be in flight at once (decoding, checks, drawing); the
    engine's lock still gives the model to one at a time."""
    import gradio as gr

    names = list(vlprune.methods())
    with gr.Blocks(title="vlprune demo", analytics_enabled=False) as app:
        gr.Markdown(f"# vlprune demo\nOne image, one question: the unpruned answer next to each pruning method's, "
                    f"with the visual tokens each method kept (bright) and dropped (dimmed); a merging method's "
                    f"tokens show the region each one averages (coloured, outlined). Model: `{engine.name}`.")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                image = _image_component(label="Image", sources=["upload"], elem_id="image", height=300)
                question = gr.Textbox(label="Question", elem_id="question", max_lines=3)
                expected = gr.Textbox(label="Expected answer", info="optional; a sample fills it in", elem_id="expected",
                                      max_lines=1)
                methods = gr.CheckboxGroup(names, value=[m for m in DEFAULT_METHODS if m in names],
                                           label="Methods", elem_id="methods")
                with gr.Accordion("What each method does", open=False, elem_id="method-notes"):
                    gr.Markdown("\n".join(f"- **{m}**: {method_summary(m)}" for m in names))
                mode = gr.Radio(["ratio", "keep"], value="ratio", label="Budget given as", elem_id="mode")
                ratio = gr.Slider(0, RATIO_MAX, value=0.75, step=0.01, label="Reduction ratio (fraction of visual tokens removed)",
                                  elem_id="ratio")
                keep = gr.Number(value=64, precision=0, label="Tokens to keep per image", elem_id="keep", interactive=False)
                run = gr.Button("Compare", variant="primary", elem_id="run")
                if examples := sample_examples():
                    gr.Markdown(SAMPLES_NOTE, elem_id="samples-note")
                    gr.Examples(examples, inputs=[image, question, expected], label="Samples")
            with gr.Column(scale=2, min_width=280):
                status = gr.Markdown("Upload an image, ask a question, press **Compare**.", elem_id="status")
                table = gr.Markdown(elem_id="table")
                gallery = gr.Gallery(label="Kept patches (bright) per method", elem_id="gallery", columns=3,
                                     object_fit="contain", height="auto")
                with gr.Accordion("The table as JSON (the API's fourth output)", open=False):
                    result = gr.JSON(label="Result", elem_id="details")
        mode.change(budget_controls, mode, [ratio, keep], queue=False, api_visibility="private")
        image.upload(lambda: "", None, expected, queue=False, api_visibility="private")  # a new image: no known answer

        def compare(image, question, methods, mode, ratio, keep, expected=None):
            """Named parameters for API callers; ``expected`` may be left out (it came last, later)."""
            return handle_request(engine, image, question, methods, mode, ratio, keep, expected)

        run.click(compare, [image, question, methods, mode, ratio, keep, expected],
                  [status, table, gallery, result], api_name="compare", concurrency_limit=concurrency,
                  show_progress="minimal")  # a small timer: a full-page animation costs CPU the timings share
    return app


def launch(app, **kw):
    """``app.launch(**kw)`` with the page's :data:`CSS` (Gradio 6 takes CSS at launch, not in ``gr.Blocks``)."""
    return app.launch(css=CSS, **kw)


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
    launch(build_app(engine, args.concurrency), server_name=args.host, server_port=args.port, share=args.share,
           max_file_size=2 * MAX_BYTES)


if __name__ == "__main__":
    main()
