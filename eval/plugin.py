"""The lmms-eval model ``vlprune``: any built-in lmms-eval model with its HF model pruned by ``vlprune.patch``.

    lmms-eval eval --model vlprune \\
        --model_args base=llava_hf,pretrained=llava-hf/llava-1.5-7b-hf,method=hiprune,ratio=0.889 --tasks gqa

How it plugs in: lmms-eval 0.7.3 resolves ``--model`` through its v2 registry, which reads the Python
entry-point group ``lmms_eval.models`` (a bare ``@register_model`` is not seen by its CLI). Our entry point,
:func:`manifests`, registers ``vlprune``. Its class never wraps the base model in another layer:
``create_from_arg_string`` builds the *base* lmms-eval model (``llava_hf``, ``qwen2_5_vl``, ...) from the
remaining arguments, patches the HF model inside it, and returns that very object. Every request type,
prompt format, batching rule and data-parallel behaviour is therefore exactly the base's; the patch
handle is on ``lm.vlprune_handle`` (and the model's ``_vlprune``).

model_args: ``base`` (default ``llava_hf``; ``embedded`` = vlprune's offline model), ``method``,
``ratio`` or ``keep``, ``positions``; keys that name an option of the method (``layer=-3``) go to the
method; everything else goes to the base model. Without ``method`` the base runs unpruned (a baseline
through the same code path).

What a run records: the patch is logged once (method, budget, every option); each answer of a
``generate_until`` request carries the visual tokens its images kept (``visual_tokens_kept`` in the
sample's ``token_counts`` with ``--log_samples``); results.json's ``model_backend`` names the patch, e.g.
``...LlavaHf+vlprune(fastervlm keep=64 layer=-3) (chat)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from lmms_eval.api.instance import GenerationResult, TokenCounts, unwrap_generation_output
from lmms_eval.api.model import lmms
from loguru import logger

from vlprune.errors import VlpruneError

#: vlprune's own bases (not lmms-eval models): name -> "module:Class"
OWN_BASES = {"embedded": "vlprune.eval.embedded_lmms:EmbeddedLlava"}
#: the bases whose HF model class vlprune has a patcher for (others may still work: the patch decides)
SUGGESTED_BASES = ("llava_hf", "llava_onevision", "llava", "qwen2_5_vl", "embedded")
PATCH_KEYS = ("method", "ratio", "keep", "positions")


def available_bases() -> list[str]:
    """Every name ``base=`` accepts: vlprune's own plus every model lmms-eval has registered (but not us)."""
    from lmms_eval.models import list_available_models

    return sorted(set(OWN_BASES) | set(list_available_models(include_aliases=True)) - {"vlprune"})


def base_class(base: str, simple: bool):
    """The lmms-eval class of ``base``; an unknown name is a clear error listing the bases."""
    if base in OWN_BASES:
        import importlib

        module, name = OWN_BASES[base].split(":")
        return getattr(importlib.import_module(module), name)
    from lmms_eval.models import get_model, list_available_models

    if base == "vlprune" or base not in list_available_models(include_aliases=True):
        raise VlpruneError(f"unknown base={base!r} for --model vlprune. Typical bases: {', '.join(SUGGESTED_BASES)}; "
                           f"all bases: {', '.join(available_bases())}")
    return get_model(base, force_simple=simple)


def split_args(args: dict) -> tuple[str, dict, dict]:
    """(base, patch kwargs for ``vlprune.patch``, kwargs for the base model) from parsed model_args."""
    from vlprune.registry import get_method

    args = dict(args)
    base = args.pop("base", "llava_hf")
    patch = {k: args.pop(k) for k in PATCH_KEYS if k in args and args[k] is not None}
    if "keep" in patch:
        patch["keep"] = _integral(patch["keep"])
    if "method" in patch:
        fields = {f.name: f for f in dataclasses.fields(get_method(patch["method"]))}
        for k in [k for k in args if k in fields]:
            default, value = fields[k].default, args.pop(k)
            patch[k] = _integral(value) if isinstance(default, int) or default is None or "int" in str(
                fields[k].type) else value
    elif set(patch) - {"positions"}:
        raise VlpruneError(f"ratio/keep given without method= in model_args ({patch}); add method=NAME "
                           f"(vlprune.methods() lists them) or drop them for an unpruned run")
    return base, patch, args


def _integral(value):
    """lmms-eval parses "-2" as the float -2.0 (only digit-only strings become ints); layer indices and
    token counts must be ints, so whole floats are turned back into ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def hf_model(lm):
    """The HF (torch) model inside an lmms-eval model, unwrapped from accelerate/DDP."""
    import torch

    for candidate in (getattr(lm, "model", None), getattr(lm, "_model", None)):
        while hasattr(candidate, "module") and isinstance(candidate.module, torch.nn.Module):
            candidate = candidate.module  # DistributedDataParallel
        if isinstance(candidate, torch.nn.Module):
            return candidate
    raise VlpruneError(f"cannot find the torch model inside the lmms-eval model {type(lm).__name__} "
                       f"(no .model / ._model attribute holding an nn.Module)")


def _default_device(klass, base_args: dict, extra: dict) -> None:
    """Single-process runs: ``device`` defaults to cuda when there is one, else cpu, and ``device_map`` to
    that device. Why: lmms-eval's HF bases default to device="cuda" and device_map="", and transformers 5
    rejects device_map="" (lmms-eval fills it in only for multi-process launches, which we leave alone)."""
    import inspect
    import os

    import torch

    params = inspect.signature(klass.__init__).parameters
    device = base_args.get("device") or extra.get("device")
    if not device and "device" in params:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        base_args["device"] = device
    if "device_map" in params and "device_map" not in base_args and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        base_args["device_map"] = str(device or "cpu")


def apply_patch(lm, patch: dict):
    """Patch the HF model inside ``lm`` (``patch`` = ``vlprune.patch`` kwargs; empty = unpruned), say so once
    in the log, name the backend after the patch and count the tokens each answer kept."""
    import vlprune

    base = getattr(type(lm), "_vlprune_base", type(lm))
    model = hf_model(lm)
    if patch.get("method"):
        kwargs = dict(patch)
        lm.vlprune_handle = vlprune.patch(model, kwargs.pop("method"), **kwargs)
        c = lm.vlprune_handle.config
        logger.info(f"vlprune: {type(model).__name__} in {base.__name__} pruned by {describe(c)} "
                    f"(every option: {', '.join(f'{k}={v}' for k, v in c.options.items()) or 'none'}; "
                    f"positions={c.positions})")
    else:
        lm.vlprune_handle = None
        logger.info(f"vlprune: {type(model).__name__} in {base.__name__} runs unpruned (no method= given)")
    _label(lm, describe(lm.vlprune_handle.config) if lm.vlprune_handle else "unpruned")
    _count_kept(lm)
    return lm.vlprune_handle


def describe(config) -> str:
    """``fastervlm keep=64 layer=-3``: a patch's method, budget and the options that differ from the defaults."""
    from vlprune.registry import get_method

    defaults = {f.name: f.default for f in dataclasses.fields(get_method(config.method))}
    words = [config.method] + [f"{k}={v}" for k, v in (("ratio", config.ratio), ("keep", config.keep)) if v is not None]
    words += [f"{k}={v}" for k, v in config.options.items() if defaults.get(k, dataclasses.MISSING) != v]
    if config.positions != "contiguous":
        words.append(f"positions={config.positions}")
    return " ".join(words)


_LABELS: dict = {}


def _label(lm, text: str) -> None:
    """lmms-eval names the backend in results.json after the model object's class (``model_backend``), so the
    patched object gets a subclass of its base named after the patch. The subclass defines nothing: the
    object and its behaviour stay the base's."""
    base = getattr(type(lm), "_vlprune_base", type(lm))
    if (base, text) not in _LABELS:
        name = f"{base.__name__}+vlprune({text})"
        _LABELS[base, text] = type(base)(name, (base,), {"_vlprune_base": base, "__module__": base.__module__,
                                                          "__qualname__": name, "__doc__": base.__doc__})
    lm.__class__ = _LABELS[base, text]


# -- visual tokens kept, per answer -------------------------------------------------------------------------
KEPT = "visual_tokens_kept"


@dataclasses.dataclass
class KeptCounts(TokenCounts):
    """lmms-eval's token counts of one request plus the visual tokens each of its images kept. The counts
    are the one per-request field lmms-eval copies into a logged sample, so the kept counts travel in it."""

    visual_tokens_kept: list[int] | None = None

    def to_dict(self) -> dict:
        return {**super().to_dict(), KEPT: self.visual_tokens_kept}


def kept_of_sample(sample: dict) -> list[int] | None:
    """The visual tokens kept per image of one logged sample (None: unpruned, or not a generate request)."""
    for entry in sample.get("token_counts") or []:
        if isinstance(entry, dict) and entry.get(KEPT) is not None:
            return entry[KEPT]
    return None


class _Docs:
    """``lm.task_dict`` as a base reads it (``task_dict[task][split][doc_id]``), telling ``seen`` each
    (task, doc_id) it reads: a base reads a batch's docs in the order of the rows it then generates."""

    def __init__(self, data, seen, path=()):
        self._data, self._seen, self._path = data, seen, path

    def __getitem__(self, key):
        value = self._data[key]
        if len(self._path) < 2:
            return _Docs(value, self._seen, (*self._path, key))
        self._seen((self._path[0], key))
        return value

    def __getattr__(self, name):
        return getattr(self._data, name)

    def __len__(self):
        return len(self._data)

    def __iter__(self):
        return iter(self._data)


class _KeptTracker:
    """Pairs each generated batch's image records (``handle.last``, rows in batch order) with the docs read
    just before it. A batch whose generate failed leaves ``handle.last`` unchanged, so its docs are still
    queued when the next batch is generated; only the last ``rows`` queued docs are paired with that batch,
    and the failed batch's answers get no count rather than another batch's."""

    def __init__(self, handle):
        self.handle, self.pending, self.kept = handle, [], {}
        self.seen_last = handle.last

    def read(self, key) -> None:
        self.flush()
        self.pending.append(key)

    def flush(self) -> None:
        last = self.handle.last
        if last is self.seen_last:
            return
        self.seen_last, rows = last, max((r.row for r in last), default=-1) + 1
        batch, self.pending = (self.pending[len(self.pending) - rows:] if rows <= len(self.pending) else []), []
        for row, key in enumerate(batch):
            self.kept.setdefault(key, []).append([int(r.after) for r in last if r.row == row])

    def take(self, key):
        found = self.kept.get(key)
        return found.pop(0) if found else None


def _with_kept(output, kept):
    text, counts = unwrap_generation_output(output)
    if kept is None or not isinstance(text, str):
        return output
    fields = dataclasses.asdict(counts) if counts is not None else {}
    return GenerationResult(text=text, token_counts=KeptCounts(**fields, visual_tokens_kept=kept))


def _count_kept(lm) -> None:
    """Give ``lm`` (once) an instance-level ``generate_until`` that returns each answer with the visual tokens
    its images kept (read from the active handle; nothing is added when unpruned)."""
    if "generate_until" in vars(lm):
        return
    generate = lm.generate_until

    def generate_until(requests):
        handle = getattr(lm, "vlprune_handle", None)
        if handle is None or not requests:
            return generate(requests)
        tracker, docs = _KeptTracker(handle), lm.task_dict
        lm.task_dict = {task: _Docs(data, tracker.read, (task,)) for task, data in docs.items()}
        try:
            outputs = generate(requests)
        finally:
            lm.task_dict = docs
        tracker.flush()
        return [_with_kept(out, tracker.take((req.task_name, req.doc_id))) for req, out in zip(requests, outputs)]

    lm.generate_until = generate_until


def build(arg: str | dict | None, additional_config: dict | None = None, simple: bool = False):
    """The patched base lmms-eval model for a model_args string/dict (what ``--model vlprune`` creates)."""
    from lmms_eval import utils

    args = utils.simple_parse_args_string(arg) if isinstance(arg, str) else dict(arg or {})
    base, patch, base_args = split_args(args)
    if patch.get("method"):  # validate before a slow model load
        from vlprune.budget import Budget
        from vlprune.registry import get_method

        cls = get_method(patch["method"])
        if cls.budgeted:
            Budget(ratio=patch.get("ratio"), keep=patch.get("keep"))
        cls.create(**{k: v for k, v in patch.items() if k not in PATCH_KEYS})
    if "positions" in patch:
        from vlprune.api import POSITIONS

        if patch["positions"] not in POSITIONS:
            raise VlpruneError(f"positions must be one of {', '.join(POSITIONS)}; got positions={patch['positions']!r}")
    klass = base_class(base, simple)
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    _default_device(klass, base_args, extra)
    lm = klass(**base_args, **extra)
    apply_patch(lm, patch)
    return lm


class VlpruneLM(lmms):
    """Registered as ``vlprune`` (chat resolution). Never instantiated: see the module docstring."""

    is_simple = False

    @classmethod
    def create_from_arg_string(cls, arg_string: str | dict, additional_config: dict | None = None):
        return build(arg_string, additional_config, simple=cls.is_simple)

    def __init__(self, *args: Any, **kwargs: Any):
        raise TypeError("vlprune's lmms-eval model is built with create_from_arg_string (it returns the patched "
                        "base model); use vlprune.eval.plugin.build(...) from Python")

    def loglikelihood(self, requests):  # pragma: no cover - never instantiated
        raise NotImplementedError

    def generate_until(self, requests):  # pragma: no cover
        raise NotImplementedError

    def generate_until_multi_round(self, requests):  # pragma: no cover
        raise NotImplementedError


class VlpruneSimpleLM(VlpruneLM):
    """``--force_simple``: the base is built as its simple (non-chat) lmms-eval model."""

    is_simple = True


def manifests():
    """Entry point of the ``lmms_eval.models`` group (see pyproject.toml).

    Also lists ``vlprune`` in the dicts ``lmms-eval models`` prints: in 0.7.3 that command reads only the
    built-in dicts, not the registry, so without this the model works but is not listed.
    """
    import sys

    from lmms_eval.models.registry_v2 import ModelManifest

    listing = sys.modules.get("lmms_eval.models")
    for table in ("AVAILABLE_SIMPLE_MODELS", "AVAILABLE_CHAT_TEMPLATE_MODELS"):
        if listing is not None and isinstance(getattr(listing, table, None), dict):
            getattr(listing, table)["vlprune"] = "vlprune.eval.plugin." + (
                "VlpruneSimpleLM" if table.startswith("AVAILABLE_SIMPLE") else "VlpruneLM")
    return [ModelManifest(model_id="vlprune", simple_class_path="vlprune.eval.plugin.VlpruneSimpleLM",
                          chat_class_path="vlprune.eval.plugin.VlpruneLM")]
