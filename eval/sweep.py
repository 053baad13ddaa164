"""The engine of ``vlprune-eval`` (the command line is ``cli.py``): accuracy and prefill latency of pruning
methods x budgets, through lmms-eval.

The model is loaded once; every cell of the grid (``cells.py``: the unpruned baseline once, then each method
at each budget) patches it with ``vlprune.patch``, runs ``lmms_eval.evaluator.simple_evaluate`` on it, times
the prefill of one captured evaluation input, and removes the patch. A finished cell is cached in
``OUTPUT/runs/<cell>/cell.json`` (with lmms-eval's own results and, with ``log_samples``, its per-sample
answers beside it), so an interrupted sweep resumes where it stopped; a cell that raises is recorded as
failed with its error and the sweep goes on (it is retried on the next run). After every cell the tidy
``results.csv``/``results.jsonl``, the Markdown table ``results.md`` and the plots are rewritten from all
finished cells (``report.py``).
"""
from __future__ import annotations

import json
import math
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cells import Cell, read_record, reuse_problem
from .probe import Probe
from .report import OBJECTS_TASK, PRIMARY, write_all

EMBEDDED = "embedded"
SCENES_TASK = "vlprune_scenes"
DEFAULTS = dict(model=EMBEDDED, methods="fastervlm,hiprune,pool,random", ratios="0.75,0.889",
                tasks=SCENES_TASK, limit=60, output="vlprune-eval-results", bootstrap_iters=1000)
__all__ = ["Config", "Sweep", "Probe", "summary_of", "model_weights", "EMBEDDED", "SCENES_TASK",
           "OBJECTS_TASK", "PRIMARY", "DEFAULTS"]


def summary_of(results: dict) -> dict:
    """``{"metrics": {task: {metric: value}}, "stderr": {task: {metric: s.e.}}, "n": {task: items}}`` from
    lmms-eval's results. The standard error is lmms-eval's own ``<metric>_stderr`` (analytic for a mean,
    bootstrapped for f1, median ...; "N/A" where it has none, then left out); a filter other than ``none``
    stays in the metric name; aliases, booleans and NaN are dropped."""
    metrics: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float]] = {}
    sizes: dict[str, int] = {}
    for task, entries in (results.get("results") or {}).items():
        for key, value in entries.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                continue
            metric, filt = key.split(",", 1)
            suffix = "" if filt == "none" else f",{filt}"
            if metric.endswith("_stderr"):
                stderr.setdefault(task, {})[metric[:-len("_stderr")] + suffix] = float(value)
            elif "_stderr" not in metric:  # _stderr_clt, _stderr_clustered: other estimators, not used
                metrics.setdefault(task, {})[metric + suffix] = float(value)
        counted = (results.get("n-samples") or {}).get(task, {})
        n = entries.get("samples", counted.get("effective"))
        if isinstance(n, float) and 0 < n < 1 and isinstance(counted.get("original"), int):
            n = math.ceil(counted["original"] * n)  # a fractional --limit: lmms-eval runs ceil(fraction x docs)
        if isinstance(n, int) and not isinstance(n, bool):
            sizes[task] = n
    stderr = {t: {m: s for m, s in v.items() if m in metrics.get(t, {})} for t, v in stderr.items()}
    return {"metrics": metrics, "stderr": {t: v for t, v in stderr.items() if v}, "n": sizes}


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
    weights: str = ""  # model_weights(model): retrained weights under the same name are another model
    bootstrap_iters: int = DEFAULTS["bootstrap_iters"]  # lmms-eval's; 0 = no standard errors
    log_samples: bool = False  # keep every answer (runs/<cell>/samples_<task>.jsonl)

    def fingerprint(self) -> dict:
        """What makes two cells comparable (batch size and device change timings, not answers; logging the
        samples adds a file, checked on its own)."""
        keep = {k: v for k, v in asdict(self).items()
                if k not in ("batch_size", "device", "include_path", "log_samples")}
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

    def load_cached(self, cell: Cell, say=lambda _m: None) -> dict | None:
        """The finished record of ``cell`` under this configuration, or None. ``say`` hears why a cell.json
        that is there is not used: a malformed one (not JSON, not an object, no metrics) as a warning, since
        it is recomputed rather than trusted; a failed, other or differently configured one as a note."""
        path = self.cell_dir(cell) / "cell.json"
        record, problem = read_record(path)
        if problem:
            say(f"warning: {path} {problem}; recomputing that cell")
            return None
        if record is None:
            return None
        problem = reuse_problem(record, cell, self.config.fingerprint(), self.config.log_samples)
        if problem:
            say(f"{cell.key}: the cached cell {problem}")
            return None
        return record

    def run(self, cells: list[Cell]) -> list[dict]:
        """Every cell, cached ones read back; returns the cell records in grid order."""
        records, started = [], time.time()
        cached = {c.key: self.load_cached(c, self.log) for c in cells}  # read (and warned about) once
        todo = [c for c in cells if cached[c.key] is None]
        done_before = len(cells) - len(todo)
        if done_before:
            self.log(f"resuming: {done_before} of {len(cells)} cells already finished in {self.out / 'runs'}")
        ran = 0
        for i, cell in enumerate(cells, 1):
            if cached[cell.key] is not None:
                self.cached.append(cell.key)
                self.log(f"[{i}/{len(cells)}] {cell.key}: cached")
                records.append(cached[cell.key])
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
            write_all(self.out, records + [r for c in cells[i:] if (r := cached[c.key])], self.config.model)
        return records

    def run_cell(self, cell: Cell) -> dict:
        t = time.time()
        d = self.cell_dir(cell)
        d.mkdir(parents=True, exist_ok=True)
        record = {"cell": cell.to_dict(), "key": cell.key, "budget": cell.budget, "model": self.config.model,
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

        from .plugin import apply_patch, hf_model

        import torch

        lm = self.lm()
        # lmms-eval's evaluate() ends with lm.clean(), which deletes every nn.Module attribute of the
        # model object; the sweep reuses one loaded model for all cells, so it puts them back afterwards
        modules = {k: v for k, v in vars(lm).items() if isinstance(v, torch.nn.Module)}
        model = hf_model(lm)
        kwargs = cell.patch_kwargs()
        handle = apply_patch(lm, kwargs)
        probe = Probe(model)
        try:
            results = simple_evaluate(model=lm, tasks=list(self.config.tasks), limit=self.config.limit,
                                      batch_size=self.config.batch_size, task_manager=self.task_manager(),
                                      bootstrap_iters=self.config.bootstrap_iters,
                                      log_samples=self.config.log_samples, verbosity="WARNING")
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
        out = summary_of(results or {})
        if not out["metrics"]:
            raise RuntimeError("lmms-eval returned no metrics (every task failed or was empty)")
        out.update(prefill_ms=prefill_ms, kept_tokens=kept, patch=options)
        if self.config.log_samples:
            out["samples"] = write_samples(d, (results or {}).get("samples") or {})
        if self.config.objects and self.config.model == EMBEDDED:
            out["metrics"][OBJECTS_TASK] = {"objects_kept": self._objects_kept(model, cell, kwargs)}
            out["n"][OBJECTS_TASK] = self.config.objects
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
        se = (record.get("stderr") or {}).get(task, {}).get(metric)
        parts.append(f"{task} {metric}={metrics[metric]:.4g}" + (f" ± {se:.2g}" if se is not None else ""))
    if record.get("prefill_ms") is not None:
        parts.append(f"prefill {record['prefill_ms']:.1f} ms")
    if record.get("kept_tokens") is not None:
        parts.append(f"{record['kept_tokens']:g} visual tokens")
    return ", ".join(parts)


def write_samples(folder: Path, samples: dict) -> dict[str, str]:
    """``samples_<task>.jsonl`` in the cell's folder: lmms-eval's logged samples (answer, target, scores,
    token counts), each with ``visual_tokens_kept`` (per image; null for the unpruned model, which keeps
    them all) lifted out of the counts the plugin adds. Returns {task: file name}."""
    from .plugin import kept_of_sample

    files = {}
    for task, items in samples.items():
        name = f"samples_{task}.jsonl"
        with open(folder / name, "w") as f:
            for sample in items:
                f.write(json.dumps({**sample, "visual_tokens_kept": kept_of_sample(sample)}, default=str) + "\n")
        files[task] = name
    return files


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


