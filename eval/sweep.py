"""``vlprune-eval``: accuracy and prefill latency of pruning methods x budgets, through lmms-eval.

    vlprune-eval                                   # offline: the embedded model on its own scenes task
    vlprune-eval --model llava-hf/llava-1.5-7b-hf --methods fastervlm,hiprune --keep 192,128,64 \\
                 --tasks gqa,pope --device cuda
    vlprune-eval --recipe llava15-paper            # a paper's grid (eval/recipes/), numbers to compare

The model is loaded once; every cell of the grid (the unpruned baseline once, then each method at each
budget) patches it with ``vlprune.patch``, runs ``lmms_eval.evaluator.simple_evaluate`` on it, times the
prefill of one captured evaluation input, and removes the patch. A finished cell is cached in
``OUTPUT/runs/<cell>/cell.json`` (with lmms-eval's own results beside it), so an interrupted sweep
resumes where it stopped; a cell that raises is recorded as failed with its error and the sweep goes on
(it is retried on the next run). After every cell the tidy ``results.csv``/``results.jsonl``, the
Markdown table ``results.md`` and the plots are rewritten from all finished cells.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlprune.errors import VlpruneError

EMBEDDED = "embedded"
SCENES_TASK = "vlprune_scenes"
OBJECTS_TASK = "scenes_objects"  # the model-free "objects kept" metric's pseudo task
DEFAULTS = dict(model=EMBEDDED, methods="fastervlm,hiprune,pool,random", ratios="0.75,0.889",
                tasks=SCENES_TASK, limit=60, output="vlprune-eval-results")
#: the metric a task's column shows in the Markdown table and the plots (others are in the CSV)
PRIMARY = {SCENES_TASK: "accuracy", "pope": "pope_accuracy", "mme": "mme_perception_score",
           "gqa": "exact_match", "textvqa_val": "exact_match", "vqav2_val": "exact_match",
           "scienceqa_img": "exact_match", "mmbench_en_dev": "gpt_eval_score", OBJECTS_TASK: "objects_kept"}
AUTO_BASE = {"llava": "llava_hf", "llava_next": "llava_hf", "llava_onevision": "llava_onevision",
             "qwen2_5_vl": "qwen2_5_vl"}


# -- the grid -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One run: ``method=None`` is the unpruned baseline; budgeted methods carry a ratio or a keep."""

    method: str | None = None
    ratio: float | None = None
    keep: int | None = None

    @property
    def key(self) -> str:
        if self.method is None:
            return "unpruned"
        if self.ratio is not None:
            return f"{self.method}-ratio{self.ratio:g}"
        return f"{self.method}-keep{self.keep}" if self.keep is not None else f"{self.method}-own"

    @property
    def budget(self) -> str:
        if self.method is None:
            return "unpruned"
        if self.ratio is not None:
            return f"ratio {self.ratio:g}"
        return f"keep {self.keep}" if self.keep is not None else "own"

    def patch_kwargs(self) -> dict:
        kw = {"method": self.method} if self.method else {}
        kw.update({k: v for k, v in (("ratio", self.ratio), ("keep", self.keep)) if v is not None})
        return kw


def _numbers(text: str | None, kind, name: str) -> list:
    if not text:
        return []
    try:
        return [kind(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise VlpruneError(f"--{name} takes comma-separated {kind.__name__}s, e.g. "
                           f"{'0,0.75,0.889' if kind is float else '192,128,64'}; got {text!r}") from None


def grid(methods: list[str], ratios: list[float] = (), keeps: list[int] = ()) -> list[Cell]:
    """The unpruned baseline, then every method at every budget (ratio 0 is the baseline itself, so it is
    not repeated per method; a method that decides its own budget runs once)."""
    from vlprune.budget import Budget
    from vlprune.registry import get_method

    if ratios and keeps:
        raise VlpruneError("give --ratios or --keep, not both (ratio = fraction of visual tokens removed, "
                           "keep = visual tokens kept per image)")
    budgets = [Budget(ratio=r) for r in ratios if r != 0] + [Budget(keep=k) for k in keeps]
    cells = [Cell()]
    for name in methods:
        cls = get_method(name)  # unknown name -> error with the nearest registered name
        if not cls.budgeted:
            cells.append(Cell(name))
            continue
        cells += [Cell(name, b.ratio, b.keep) for b in budgets]
    return cells


# -- measuring inside a cell ---------------------------------------------------------------------------
class Probe:
    """Watches the HF model during one cell: keeps the tensor inputs of its first ``generate`` (or
    pixel-carrying forward) call, to time the prefill on a real evaluation input afterwards, and records
    exceptions raised by ``generate`` (some lmms-eval models log them and answer "", which would
    otherwise turn a broken patch into a silent accuracy of zero)."""

    def __init__(self, model):
        import torch

        self.model, self.inputs, self.errors, self.calls = model, None, [], 0
        self._had = "generate" in model.__dict__
        self._old = model.__dict__.get("generate")
        original = model.generate

        def generate(*args, **kwargs):
            self.calls += 1
            self._keep(kwargs)
            try:
                return original(*args, **kwargs)
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                raise

        model.generate = generate
        self._hook = model.register_forward_pre_hook(lambda _m, _a, kw: self._keep(kw), with_kwargs=True)
        self._torch = torch

    def _keep(self, kwargs):
        if self.inputs is None and kwargs.get("pixel_values") is not None:
            inputs = {k: v for k, v in kwargs.items() if isinstance(v, self._torch.Tensor)}
            rows = inputs["input_ids"].shape[0] if "input_ids" in inputs else 0
            if rows > 1 and all(v.shape[0] == rows for v in inputs.values()):
                inputs = {k: v[:1] for k, v in inputs.items()}  # one prompt: comparable across batch sizes
            self.inputs = inputs

    def remove(self):
        self._hook.remove()
        if self._had:
            self.model.generate = self._old
        else:
            self.model.__dict__.pop("generate", None)

    def prefill(self, handle, repeats: int = 3) -> tuple[float | None, float | None]:
        """(median prefill ms of one forward pass on the captured input, visual tokens kept per image)."""
        if self.inputs is None:
            return None, None
        torch = self._torch
        times = []
        with torch.inference_mode():
            for i in range(repeats + 1):
                if any(t.is_cuda for t in self.inputs.values()):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                self.model(**self.inputs)
                if any(t_.is_cuda for t_ in self.inputs.values()):
                    torch.cuda.synchronize()
                if i:  # the first is a warm-up
                    times.append((time.perf_counter() - t) * 1000)
        if handle is not None and handle.last:
            kept = statistics.mean(r.after for r in handle.last)
        else:
            image_token = getattr(self.model.config, "image_token_id", None) or getattr(
                self.model.config, "image_token_index", None)
            ids, pix = self.inputs.get("input_ids"), self.inputs.get("pixel_values")
            kept = None
            if image_token is not None and ids is not None:
                images = len(self.inputs["image_grid_thw"]) if "image_grid_thw" in self.inputs else pix.shape[0]
                kept = float((ids == image_token).sum()) / max(images, 1)
        return round(statistics.median(times), 2), kept


def metrics_of(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lmms-eval's results (numbers only; stderr and aliases dropped; a
    filter other than ``none`` stays in the metric name)."""
    out: dict[str, dict[str, float]] = {}
    for task, entries in (results.get("results") or {}).items():
        for key, value in entries.items():
            if "," not in key or "_stderr" in key or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            if isinstance(value, (int, float)) and value == value:
                out.setdefault(task, {})[metric if filt == "none" else f"{metric},{filt}"] = float(value)
    return out


# -- the sweep ------------------------------------------------------------------------------------------
@dataclass
class Config:
    model: str = EMBEDDED
    base: str | None = None
    model_args: str = ""
    tasks: list[str] = field(default_factory=lambda: [SCENES_TASK])
    limit: float | None = None
    batch_size: int = 1
    device: str = "cpu"
    include_path: list[str] = field(default_factory=list)
    objects: int = 0  # scenes for the model-free objects-kept metric (embedded model only)
    method_options: dict = field(default_factory=dict)  # {method: {option: value}}
    weights: str = ""  # model_weights(model): retrained weights under the same name are another model

    def fingerprint(self) -> dict:
        """What makes two cells comparable (batch size and device change timings, not answers)."""
        keep = {k: v for k, v in asdict(self).items() if k not in ("batch_size", "device", "include_path")}
        keep["tasks"] = sorted(keep["tasks"])
        return keep


def model_weights(model: str) -> str:
    """A short digest of the weights behind ``--model``, so that resuming into a folder never reuses cells
    of other weights under the same name (the embedded model retrained, a checkpoint folder overwritten).
    Local folders: each weight file's name and size, and its first and last MiB (cheap for 10 GB
    checkpoints; any retraining changes them). Hub ids: the cached snapshot's commit."""
    import hashlib

    if model == EMBEDDED:
        from vlprune.embedded import asset_dir

        folder = asset_dir()
    else:
        folder = Path(model).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(model, "config.json")
            return f"snapshot:{Path(found).parent.name}" if isinstance(found, str) else ""
        except Exception:
            return ""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt", ".pth") or f.name == "config.json":
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read())
    return h.hexdigest()[:16]


class Sweep:
    """Runs cells on one loaded model and caches each finished cell under ``out/runs/<cell.key>``."""

    def __init__(self, config: Config, out: Path, log=print, evaluate=None):
        self.config, self.out, self.log = config, Path(out), log
        self.evaluate = evaluate or self._evaluate  # tests pass their own to exercise the bookkeeping
        self._lm = self._tm = None
        self.computed: list[str] = []
        self.cached: list[str] = []
        self.failed: list[str] = []

    # where a cell lives
    def cell_dir(self, cell: Cell) -> Path:
        return self.out / "runs" / cell.key

    def load_cached(self, cell: Cell) -> dict | None:
        path = self.cell_dir(cell) / "cell.json"
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        ok = record.get("status") == "ok" and record.get("config") == self.config.fingerprint()
        return record if ok else None

    def run(self, cells: list[Cell]) -> list[dict]:
        """Every cell, cached ones read back; returns the cell records in grid order."""
        records, started = [], time.time()
        todo = [c for c in cells if self.load_cached(c) is None]
        done_before = len(cells) - len(todo)
        if done_before:
            self.log(f"resuming: {done_before} of {len(cells)} cells already finished in {self.out / 'runs'}")
        ran = 0
        for i, cell in enumerate(cells, 1):
            cached = self.load_cached(cell)
            if cached is not None:
                self.cached.append(cell.key)
                self.log(f"[{i}/{len(cells)}] {cell.key}: cached")
                records.append(cached)
                continue
            eta = ""
            if ran:
                left = (time.time() - started) / ran * (len(todo) - ran)
                eta = f", about {left / 60:.1f} min left"
            self.log(f"[{i}/{len(cells)}] {cell.key}: running ({len(todo) - ran} to run{eta})")
            record = self.run_cell(cell)
            ran += 1
            records.append(record)
            if record["status"] == "ok":
                self.computed.append(cell.key)
                self.log(f"[{i}/{len(cells)}] {cell.key}: done in {record['seconds']:.0f} s  " + _summary(record))
            else:
                self.failed.append(cell.key)
                self.log(f"[{i}/{len(cells)}] {cell.key}: FAILED ({record['error'].splitlines()[0][:200]})")
            from .report import write_all

            write_all(self.out, records + [r for c in cells[i:] if (r := self.load_cached(c))], self.config.model)
        return records

    def run_cell(self, cell: Cell) -> dict:
        t = time.time()
        d = self.cell_dir(cell)
        d.mkdir(parents=True, exist_ok=True)
        record = {"cell": asdict(cell), "key": cell.key, "budget": cell.budget, "model": self.config.model,
                  "config": self.config.fingerprint()}
        try:
            record.update(self.evaluate(cell, d))
            record["status"] = "ok"
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a failing cell is recorded, the sweep goes on
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        record["seconds"] = round(time.time() - t, 1)
        tmp = d / "cell.json.tmp"
        tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
        os.replace(tmp, d / "cell.json")  # a killed run never leaves a half-written "finished" cell
        return record

    # the real evaluation of one cell
    def lm(self):
        if self._lm is None:
            from .plugin import build

            c = self.config
            args = {**_parse_model_args(c.model_args), "base": c.base or EMBEDDED}
            if c.model != EMBEDDED:
                args.setdefault("pretrained", c.model)
            args.setdefault("device", c.device)
            self.log(f"loading {c.model} (lmms-eval model {args['base']}) ...")
            t = time.time()
            self._lm = build(args, {"batch_size": c.batch_size})
            self.log(f"loaded in {time.time() - t:.0f} s")
        return self._lm

    def task_manager(self):
        if self._tm is None:
            from lmms_eval.tasks import TaskManager

            paths = [_task_dir(), *self.config.include_path]
            ours = all(t == SCENES_TASK for t in self.config.tasks)
            self._tm = TaskManager("WARNING", include_path=paths, include_defaults=not ours)
        return self._tm

    def _evaluate(self, cell: Cell, d: Path) -> dict:
        from lmms_eval.evaluator import simple_evaluate

        from .compat import ensure_filelock_api
        from .plugin import apply_patch, hf_model

        ensure_filelock_api()
        import torch

        lm = self.lm()
        # lmms-eval's evaluate() ends with lm.clean(), which deletes every nn.Module attribute of the
        # model object; the sweep reuses one loaded model for all cells, so it puts them back afterwards
        modules = {k: v for k, v in vars(lm).items() if isinstance(v, torch.nn.Module)}
        model = hf_model(lm)
        kwargs = cell.patch_kwargs()
        if cell.method:
            kwargs.update(self.config.method_options.get(cell.method, {}))
        handle = apply_patch(lm, kwargs)
        probe = Probe(model)
        try:
            results = simple_evaluate(model=lm, tasks=list(self.config.tasks), limit=self.config.limit,
                                      batch_size=self.config.batch_size, task_manager=self.task_manager(),
                                      bootstrap_iters=0, log_samples=False, verbosity="WARNING")
            if probe.errors:
                raise RuntimeError(f"{len(probe.errors)} of {probe.calls} generate() calls raised; first: "
                                   f"{probe.errors[0]}")
            prefill_ms, kept = probe.prefill(handle)
            options = handle.config.to_dict() if handle is not None else None
        finally:
            probe.remove()
            if handle is not None:
                handle.remove()
            for name, module in modules.items():
                setattr(lm, name, module)
        (d / "lmms_eval_results.json").write_text(json.dumps(_jsonable(results), indent=1, default=str) + "\n")
        metrics = metrics_of(results or {})
        if not metrics:
            raise RuntimeError("lmms-eval returned no metrics (every task failed or was empty)")
        out = {"metrics": metrics, "prefill_ms": prefill_ms, "kept_tokens": kept, "patch": options}
        if self.config.objects and self.config.model == EMBEDDED:
            out["metrics"][OBJECTS_TASK] = {"objects_kept": self._objects_kept(model, cell, kwargs)}
        return out

    def _objects_kept(self, model, cell: Cell, kwargs: dict) -> float:
        """Share of annotated objects with at least one kept patch, on the first held-out scenes
        (``vlprune.embedded.evaluate.objects_kept``): 1.0 unpruned by construction."""
        if cell.method is None:
            return 1.0
        from vlprune.embedded import evaluate, scenes

        processor = self._lm._image_processor
        kw = dict(kwargs)
        method = kw.pop("method")
        return round(evaluate.objects_kept(model, processor, list(scenes.split("test", self.config.objects)),
                                           method, **kw), 4)


def _summary(record: dict) -> str:
    parts = []
    for task, metrics in record.get("metrics", {}).items():
        metric = PRIMARY.get(task) if PRIMARY.get(task) in metrics else next(iter(metrics))
        parts.append(f"{task} {metric}={metrics[metric]:.4g}")
    if record.get("prefill_ms") is not None:
        parts.append(f"prefill {record['prefill_ms']:.1f} ms")
    if record.get("kept_tokens") is not None:
        parts.append(f"{record['kept_tokens']:g} visual tokens")
    return ", ".join(parts)


def _jsonable(results):
    if not isinstance(results, dict):
        return results
    return {k: v for k, v in results.items() if k not in ("samples",)}


def _parse_model_args(text: str) -> dict:
    if not text:
        return {}
    from lmms_eval import utils

    return utils.simple_parse_args_string(text)


def _task_dir() -> str:
    from .scenes_task import task_dir

    return task_dir()


# -- offline checks --------------------------------------------------------------------------------------
def check_model(model: str, allow_download: bool) -> None:
    """A model that is neither a local folder nor in the Hugging Face cache: say what to download and where."""
    if model == EMBEDDED or Path(model).expanduser().is_dir() or allow_download:
        return
    if Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
        raise VlpruneError(f"--model {model!r}: no such checkpoint folder (expected a folder with config.json)")
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(model, "config.json"), str):
            return
    except Exception:
        pass
    from huggingface_hub.constants import HF_HUB_CACHE

    raise VlpruneError(
        f"--model {model!r} is not a local folder and is not in the Hugging Face cache ({HF_HUB_CACHE}). "
        f"Download it on a machine with internet, `hf download {model}` (or `huggingface-cli download {model}`), "
        f"and copy that cache folder here (or set HF_HOME to it), or pass --model /path/to/checkpoint; "
        f"--download lets this run fetch it itself.")


def check_tasks(tm, tasks: list[str], allow_download: bool) -> None:
    """Unknown task names, and datasets that cannot be loaded offline, as one clear message each."""
    from lmms_eval.tasks import get_task_dict

    unknown = [t for t in tasks if not tm.match_tasks([t])]
    if unknown:
        hints = {t: difflib.get_close_matches(t, tm.all_tasks, n=3) for t in unknown}
        raise VlpruneError("unknown task(s): " + "; ".join(
            f"{t!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items())
            + ". `lmms-eval tasks list` shows them all; --include-path adds a folder of task yamls")
    for task in tasks:
        try:
            get_task_dict([task], tm)
        except Exception as exc:
            where = _dataset_of(tm, task)
            hint = (f"Download the dataset {where!r} on a machine with internet "
                    f"(`hf download --repo-type dataset {where}`) and copy the Hugging Face cache "
                    f"(~/.cache/huggingface, or HF_HOME) here, then run again"
                    if where else "Check the task's dataset_path in its yaml")
            mode = "" if allow_download else " (offline: HF_HUB_OFFLINE=1; --download allows fetching)"
            raise VlpruneError(f"task {task!r} cannot load its data{mode}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:300]}. {hint}.") from exc


def _dataset_of(tm, task: str) -> str | None:
    try:
        from lmms_eval.utils import load_yaml_config

        info = tm.task_index.get(task) or {}
        path = info.get("yaml_path")
        return load_yaml_config(path, mode="simple").get("dataset_path") if path else None
    except Exception:
        return None


# -- recipes and the command line --------------------------------------------------------------------------
def recipe_dir() -> Path:
    return Path(__file__).resolve().parent / "recipes"


def load_recipe(name: str) -> dict:
    """``eval/recipes/NAME.yaml`` (or a path to a yaml file)."""
    import yaml

    path = Path(name)
    if not path.is_file():
        path = recipe_dir() / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in recipe_dir().glob("*.yaml"))
        raise VlpruneError(f"unknown --recipe {name!r}; shipped recipes: {', '.join(names)} (or a path to a yaml)")
    data = yaml.safe_load(path.read_text()) or {}
    data["_path"] = str(path)
    return data


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vlprune-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", help="a shipped grid (eval/recipes/NAME.yaml) or a yaml path; flags override it")
    ap.add_argument("--model", help=f"'{EMBEDDED}' (default: vlprune's offline model), a checkpoint folder or a "
                                    "Hugging Face id already in the local cache")
    ap.add_argument("--base", help="the lmms-eval model that runs it (default: from the checkpoint's model_type: "
                                   + ", ".join(f"{k}->{v}" for k, v in AUTO_BASE.items()) + ")")
    ap.add_argument("--model-args", default=None, help="more lmms-eval model_args for the base, e.g. dtype=float16")
    ap.add_argument("--methods", help=f"comma-separated (default {DEFAULTS['methods']}); vlprune.methods() lists them")
    ap.add_argument("--ratios", help="reduction ratios, e.g. 0,0.5,0.75,0.889 (0 = the unpruned baseline)")
    ap.add_argument("--keep", help="visual tokens kept per image, e.g. 192,128,64 (instead of --ratios)")
    ap.add_argument("--tasks", help=f"lmms-eval task names (default {SCENES_TASK}, vlprune's offline task)")
    ap.add_argument("--limit", type=float, help="items per task (default: all; the offline default uses "
                                                f"{DEFAULTS['limit']})")
    ap.add_argument("--output", help=f"results folder (default ./{DEFAULTS['output']}); rerun to resume")
    ap.add_argument("--batch-size", type=int, default=None, help="requests per generate (base-dependent; "
                                                                "llava_hf supports 1)")
    ap.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1 ...")
    ap.add_argument("--include-path", action="append", default=[], help="extra folder of lmms-eval task yamls")
    ap.add_argument("--objects", type=int, default=None,
                    help="embedded model: scenes for the model-free 'objects kept' metric (default: = --limit)")
    ap.add_argument("--download", action="store_true",
                    help="allow downloading models/datasets (default: offline, HF_HUB_OFFLINE=1)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return ap


def resolve(args: argparse.Namespace) -> tuple[Config, list[Cell], Path, dict]:
    """Recipe, flags and defaults merged into (config, cells, output folder, recipe)."""
    recipe = load_recipe(args.recipe) if args.recipe else {}

    def pick(name, default=None):
        value = getattr(args, name.replace("-", "_"), None)
        if value not in (None, [], ""):
            return value
        if name in recipe:
            v = recipe[name]
            return ",".join(map(str, v)) if isinstance(v, list) and name in ("methods", "ratios", "keep", "tasks") else v
        return default

    offline_default = not args.recipe and not args.model and not args.tasks
    model = str(pick("model", EMBEDDED))
    methods = [m for m in str(pick("methods", DEFAULTS["methods"])).split(",") if m]
    keeps = _numbers(pick("keep"), int, "keep")
    ratios = _numbers(pick("ratios", None if keeps else DEFAULTS["ratios"]), float, "ratios")
    tasks = [t for t in str(pick("tasks", SCENES_TASK)).split(",") if t]
    limit = pick("limit", DEFAULTS["limit"] if offline_default else None)
    base = pick("base") or (EMBEDDED if model == EMBEDDED else _auto_base(model))
    device = pick("device", "cpu")
    objects = args.objects if args.objects is not None else (int(limit) if limit and limit >= 1 else 100)
    config = Config(model=model, base=base, model_args=str(pick("model-args", "") or ""), tasks=tasks,
                    limit=limit, batch_size=int(pick("batch-size", 8 if model == EMBEDDED else 1)), device=device,
                    include_path=list(args.include_path or []) + list(recipe.get("include_path", [])),
                    objects=objects if model == EMBEDDED and SCENES_TASK in tasks else 0,
                    method_options=dict(recipe.get("method_options", {})), weights=model_weights(model))
    out = Path(pick("output", DEFAULTS["output"] if not args.recipe else f"{DEFAULTS['output']}/{recipe.get('name', args.recipe)}"))
    return config, grid(methods, ratios, keeps), out, recipe


def _auto_base(model: str) -> str:
    try:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(model).model_type
    except Exception:
        return "llava_hf"
    return AUTO_BASE.get(model_type, "llava_hf")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if not args.download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.time()
    try:
        config, cells, out, recipe = resolve(args)
        check_model(config.model, args.download)
        out.mkdir(parents=True, exist_ok=True)
        sweep = Sweep(config, out, log=lambda m: print(m, flush=True))
        _quiet_libraries()
        print(f"vlprune-eval: {config.model} x {len(cells) - 1} pruned settings + unpruned on "
              f"{', '.join(config.tasks)}" + (f" (limit {config.limit:g})" if config.limit else "") + f" -> {out}",
              flush=True)
        check_tasks(sweep.task_manager(), config.tasks, args.download)
        records = sweep.run(cells)
    except VlpruneError as exc:
        print(f"vlprune-eval: error: {exc}", file=sys.stderr)
        return 2
    from .report import write_all

    paths = write_all(out, records, config.model)
    print(f"\n{len(sweep.computed)} cells run, {len(sweep.cached)} cached, {len(sweep.failed)} failed "
          f"in {time.time() - t0:.0f} s")
    for p in paths:
        print(f"  {p}")
    print("\n" + (out / "results.md").read_text())
    if recipe.get("reported"):
        print(f"published numbers to compare with: {Path(recipe['_path']).with_suffix('.md')}")
    return 1 if sweep.failed else 0


def _quiet_libraries():
    """lmms-eval logs at INFO to stdout and datasets draws bars for every load: keep the sweep readable."""
    try:
        import datasets

        datasets.disable_progress_bar()
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="WARNING")
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
