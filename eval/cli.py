"""``vlprune-eval``: accuracy and prefill latency of pruning methods x budgets, through lmms-eval.

    vlprune-eval                                   # offline: the embedded model on its own scenes task
    vlprune-eval --model llava-hf/llava-1.5-7b-hf --methods fastervlm,hiprune --keep 192,128,64 \\
                 --tasks gqa,pope --device cuda
    vlprune-eval --methods fastervlm,pool --keep 64,32 --method-options fastervlm:layer=-3 --log-samples
    vlprune-eval --recipe llava15-paper            # a paper's grid (eval/recipes/), numbers to compare

Every flag, recipe value and the output folder is checked before the model loads; a mistake stops the
run with what is allowed. The sweep itself is ``sweep.py``, its grid and cache ``cells.py``, its tables and
plots ``report.py``.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
import tempfile
import time
from pathlib import Path

from vlprune.errors import VlpruneError

from .cells import grid
from .sweep import DEFAULTS, EMBEDDED, SCENES_TASK, Config, Sweep, model_weights

AUTO_BASE = {"llava": "llava_hf", "llava_next": "llava_hf", "llava_onevision": "llava_onevision",
             "qwen2_5_vl": "qwen2_5_vl"}
#: model_args the sweep sets itself, each from its own flag
OWN_MODEL_ARGS = {"method": "--methods", "ratio": "--ratios", "keep": "--keep", "positions": "--positions",
                  "base": "--base", "pretrained": "--model"}


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
    ap.add_argument("--method-options", action="append", default=[], metavar="METHOD:OPTION=VALUE[,OPTION=VALUE]",
                    help="options of one method, e.g. fastervlm:layer=-3 (repeat the flag for more methods); "
                         "values are ints, floats, true/false/none or text, checked by the method")
    ap.add_argument("--positions", help="LM position ids of the kept tokens: contiguous (default, as the papers) "
                                        "or original")
    ap.add_argument("--ratios", help="reduction ratios, e.g. 0,0.5,0.75,0.889 (0 = the unpruned baseline)")
    ap.add_argument("--keep", help="visual tokens kept per image, e.g. 192,128,64 (instead of --ratios)")
    ap.add_argument("--tasks", help=f"lmms-eval task names (default {SCENES_TASK}, vlprune's offline task)")
    ap.add_argument("--limit", type=float, help="items per task, a whole number >= 1, or a fraction in (0, 1) of "
                                                "each task (default: all; the offline default uses "
                                                f"{DEFAULTS['limit']})")
    ap.add_argument("--output", help=f"results folder (default ./{DEFAULTS['output']}); rerun to resume")
    ap.add_argument("--log-samples", action="store_true",
                    help="keep every answer with its visual token counts: runs/<cell>/samples_<task>.jsonl")
    ap.add_argument("--bootstrap-iters", type=int, default=None,
                    help=f"lmms-eval's bootstrap iterations for standard errors of metrics that are not means "
                         f"(means get theirs analytically); 0 = no standard errors (default "
                         f"{DEFAULTS['bootstrap_iters']})")
    ap.add_argument("--batch-size", type=int, default=None, help="requests per generate (base-dependent; "
                                                                "llava_hf supports 1)")
    ap.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1 ...")
    ap.add_argument("--include-path", action="append", default=[], help="extra folder of lmms-eval task yamls")
    ap.add_argument("--objects", type=int, default=None,
                    help="embedded model: scenes for the model-free 'objects kept' metric (default: = --limit; "
                         "0 = off)")
    ap.add_argument("--download", action="store_true",
                    help="allow downloading models/datasets (default: offline, HF_HUB_OFFLINE=1)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return ap


def _numbers(text: str | None, kind, name: str) -> list:
    if not text:
        return []
    try:
        return [kind(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise VlpruneError(f"--{name} takes comma-separated {kind.__name__}s, e.g. "
                           f"{'0,0.75,0.889' if kind is float else '192,128,64'}; got {text!r}") from None


def _literal(text: str):
    """A command-line option value: int, then float, then true/false/none, else the text itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_method_options(items: list[str]) -> dict[str, dict]:
    """``--method-options`` (repeatable) as {method: {option: value}}; the methods check the values."""
    out: dict[str, dict] = {}
    usage = "--method-options takes METHOD:OPTION=VALUE[,OPTION=VALUE...], e.g. fastervlm:layer=-3"
    for item in items:
        method, sep, rest = item.partition(":")
        pairs = [p.partition("=") for p in rest.split(",")] if rest else []
        if not sep or not method.strip() or not pairs or any(not k.strip() or not eq for k, eq, _ in pairs):
            raise VlpruneError(f"{usage}; got {item!r}")
        out.setdefault(method.strip(), {}).update({k.strip(): _literal(v.strip()) for k, _, v in pairs})
    return out


def _check_numbers(limit, batch_size, objects, bootstrap_iters, threads) -> None:
    """The numeric flags, each against what it allows (a recipe's values as much as the command line's)."""
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0 or \
                (limit >= 1 and limit != int(limit)):
            raise VlpruneError(f"--limit must be a whole number of items >= 1 or a fraction in (0, 1) of each "
                               f"task; got {limit!r} (leave it out to run every item)")
    for flag, value, low in (("--batch-size", batch_size, 1), ("--objects", objects, 0),
                             ("--bootstrap-iters", bootstrap_iters, 0), ("--threads", threads, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise VlpruneError(f"{flag} must be an int >= {low}; got {value!r}")


def check_device(device: str) -> None:
    """A device name torch knows and this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise VlpruneError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if not count or (dev.index or 0) >= count:
            raise VlpruneError(f"--device {device!r}: this machine has {count} CUDA device(s); use --device cpu"
                               + (f" or cuda:0..cuda:{count - 1}" if count else ""))


def check_model_args(text: str) -> None:
    """``--model-args``: key=value pairs for the base; the sweep's own settings have their own flags."""
    from lmms_eval import utils

    try:
        args = utils.simple_parse_args_string(text)
    except ValueError:
        raise VlpruneError(f"--model-args takes key=value pairs separated by commas, e.g. dtype=float16; "
                           f"got {text!r}") from None
    clash = {k: OWN_MODEL_ARGS[k] for k in args if k in OWN_MODEL_ARGS}
    if clash:
        raise VlpruneError("--model-args must not set " + ", ".join(f"{k} (use {f})" for k, f in clash.items()))


def check_output(out: Path) -> None:
    """The results folder can be created and written now, not only after the model has loaded."""
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out / "runs", prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
        for name in ("results.csv", "results.jsonl", "results.md"):
            if (out / name).exists() and not os.access(out / name, os.W_OK):
                raise PermissionError(13, "cannot overwrite", str(out / name))
    except OSError as exc:
        raise VlpruneError(f"--output {str(out)!r} is not usable: {exc.strerror or exc}"
                           + (f" ({exc.filename})" if exc.filename else "")
                           + "; give --output a folder this user can create and write") from None


def resolve(args: argparse.Namespace, note=None) -> tuple[Config, list, Path, dict]:
    """Recipe, flags and defaults merged and checked into (config, cells, output folder, recipe); ``note``
    hears what was collapsed (a budget given twice)."""
    recipe = load_recipe(args.recipe) if args.recipe else {}

    def pick(name, default=None):
        value = getattr(args, name.replace("-", "_"), None)
        if value not in (None, [], ""):
            return value
        if name in recipe:
            v = recipe[name]
            listed = isinstance(v, list) and name in ("methods", "ratios", "keep", "tasks")
            return ",".join(map(str, v)) if listed else v
        return default

    offline_default = not args.recipe and not args.model and not args.tasks
    model = str(pick("model", EMBEDDED))
    methods = [m for m in str(pick("methods", DEFAULTS["methods"])).split(",") if m]
    keeps = _numbers(pick("keep"), int, "keep")
    ratios = _numbers(pick("ratios", None if keeps else DEFAULTS["ratios"]), float, "ratios")
    tasks = [t for t in str(pick("tasks", SCENES_TASK)).split(",") if t]
    limit = pick("limit", DEFAULTS["limit"] if offline_default else None)
    batch_size = pick("batch-size", 8 if model == EMBEDDED else 1)
    bootstrap_iters = pick("bootstrap-iters", DEFAULTS["bootstrap_iters"])
    _check_numbers(limit, batch_size, args.objects, bootstrap_iters, args.threads)
    device = str(pick("device", "cpu"))
    model_args = str(pick("model-args", "") or "")
    check_model_args(model_args)
    options = recipe.get("method_options") or {}
    if not isinstance(options, dict) or not all(isinstance(o, dict) for o in options.values()):
        raise VlpruneError(f"a recipe's method_options maps method names to option: value pairs, e.g. "
                           f"{{fastervlm: {{layer: -3}}}}; got {options!r}")
    options = {m: dict(o) for m, o in options.items()}
    for method, given in parse_method_options(args.method_options).items():
        options.setdefault(method, {}).update(given)
    cells = grid(methods, ratios, keeps, options, str(pick("positions", "contiguous")), note=note)
    base = pick("base") or (EMBEDDED if model == EMBEDDED else _auto_base(model))
    objects = args.objects if args.objects is not None else (int(limit) if limit and limit >= 1 else 100)
    config = Config(model=model, base=base, model_args=model_args, tasks=tasks, limit=limit, batch_size=batch_size,
                    device=device, include_path=list(args.include_path or []) + list(recipe.get("include_path", [])),
                    objects=objects if model == EMBEDDED and SCENES_TASK in tasks else 0,
                    weights=model_weights(model), bootstrap_iters=bootstrap_iters,
                    log_samples=bool(args.log_samples or recipe.get("log-samples")))
    default_out = f"{DEFAULTS['output']}/{recipe.get('name', args.recipe)}" if args.recipe else DEFAULTS["output"]
    out = Path(pick("output", default_out))
    return config, cells, out, recipe


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
    t0 = time.time()
    try:
        config, cells, out, recipe = resolve(args, note=lambda m: print(f"vlprune-eval: {m}", file=sys.stderr))
        check_device(config.device)
        check_model(config.model, args.download)
        check_output(out)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
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
