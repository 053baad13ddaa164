"""Weights of learned methods: a folder with ``config.json`` and ``model.safetensors``.

The config names the method, the base model the weights were trained for (its name and the shape of its
language model) and how they were trained. A method loads them at ``patch()`` time and checks the base
against the patched model before any call, so weights trained for one model are never silently run on
another. Weights shipped for the embedded model live in ``vlprune/assets/learned/<method>/`` and are the
default on it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import VlpruneError

CONFIG, TENSORS = "config.json", "model.safetensors"
#: the fields of a base model's signature that must match for weights to apply
SIGNATURE = ("text_layers", "text_hidden_size", "vocab_size")


def signature(model) -> dict:
    """The shape of ``model``'s language model, as learned weights record it (plus its name, for messages).
    A model with no language model (an open_clip tower) has None for each field."""
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "text_config", cfg)
    name = getattr(cfg, "_name_or_path", "") or type(model).__name__
    return {"name": Path(name).name if Path(name).is_absolute() else name,
            "text_layers": getattr(text, "num_hidden_layers", None),
            "text_hidden_size": getattr(text, "hidden_size", None), "vocab_size": getattr(text, "vocab_size", None)}


def shipped(method: str) -> Path:
    """The weights shipped for the embedded model, or a clear error when this copy has none."""
    from .embedded import asset_dir

    try:
        return asset_dir(f"learned/{method}")
    except FileNotFoundError:
        raise VlpruneError(f"method={method!r} needs weights=PATH (a folder written by `vlprune-train {method}`): "
                           f"this copy of vlprune ships none for it") from None


def save(folder, method: str, base: dict, tensors: dict[str, torch.Tensor], **info) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / TENSORS))
    (folder / CONFIG).write_text(json.dumps({"method": method, "base": base, **info}, indent=1) + "\n")
    return folder


def load(folder, method: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of the weights in ``folder``, or a clear error naming ``weights``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [name for name in (CONFIG, TENSORS) if not (folder / name).is_file()]
    if missing:
        raise VlpruneError(f"weights={str(folder)!r} for method={method!r} must be a folder with {CONFIG} and "
                           f"{TENSORS} (written by `vlprune-train {method}`); missing: {', '.join(missing)}")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise VlpruneError(f"weights={str(folder)!r}: {CONFIG} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("method") != method:
        found = config.get("method") if isinstance(config, dict) else config
        raise VlpruneError(f"weights={str(folder)!r} were trained for method={found!r}, not method={method!r}")
    if not isinstance(config.get("base"), dict) or any(k not in config["base"] for k in SIGNATURE):
        raise VlpruneError(f"weights={str(folder)!r}: {CONFIG} must name the base model ('base' with "
                           f"{', '.join(SIGNATURE)})")
    return config, load_file(str(folder / TENSORS))


def check_base(config: dict, model_signature: dict, method: str, weights) -> None:
    """A clear error when weights trained for one base model are patched onto another."""
    base = config["base"]
    wrong = [f"{k} {base[k]} (model: {model_signature[k]})" for k in SIGNATURE if base[k] != model_signature[k]]
    if wrong:
        raise VlpruneError(f"weights={str(weights)!r} for method={method!r} were trained for "
                           f"{base.get('name') or 'another model'!r}, which differs from this model "
                           f"({model_signature['name']!r}) in {', '.join(wrong)}; train weights for it with "
                           f"`vlprune-train {method}`")


class Weighted:
    """The ``weights`` option of a learned method (a dataclass field): its type checked when the method is
    created, the folder loaded once at ``patch()`` (``check_base``) - the shipped one when left out."""

    def _check_weights(self) -> None:
        if not isinstance(self.weights, (str, os.PathLike, type(None))):
            raise VlpruneError(f"weights must be a path to a folder or None for method={self.name!r}; "
                               f"got weights={self.weights!r}")
        self._loaded = None  # not when support() or create() asks: patching loads them

    def loaded(self) -> tuple[Path, dict, dict[str, torch.Tensor]]:
        """(folder, config, tensors) of the weights."""
        if self._loaded is None:
            folder = self.weights if self.weights is not None else shipped(self.name)
            self._loaded = (folder, *load(folder, self.name))
        return self._loaded

    def check_base(self, base: dict) -> None:
        folder, config, _ = self.loaded()
        check_base(config, base, self.name, folder)

    def options(self) -> dict:
        out = super().options()
        out["weights"] = None if self.weights is None else str(self.weights)
        return out
