"""Shared ground of the tests against each method's released code (``tests/test_released_*.py``).

Each such test re-implements, from reading the authors' code, what that code selects, runs it on tensors
captured from a tiny LLaVA, and compares with what vlprune keeps on the same model and inputs. The
towers here are built so that selections are not decided by ties: random weights give near-uniform
[CLS] rows, so every weight matrix is scaled (``tiny.sharpen``) and the query projections once more.
Two geometries (576 patches, LLaVA-1.5's 24 x 24 grid, and 256 patches, 16 x 16) and a batch of two
different images.

``Captured`` holds, per encoder layer, the tensors an eager re-implementation needs: the layer's input
hidden states, its q/k/v projections split into heads, the full softmax attention (computed here
eagerly, as the released code does) and the output hidden states; plus the projected features of the
layer LLaVA reads (-2).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

import tiny
import vlprune
from vlprune.patches._clip import encoder_layers

#: image size -> patches per image (patch 14): LLaVA-1.5's 576 and a second, smaller grid
GEOMETRIES = {336: 576, 224: 256}
Q_SHARPEN = 4.0  # on top of tiny.sharpen's 3x: the [CLS] rows get clear winners


@functools.lru_cache(maxsize=None)
def model(size: int):
    """A tiny LLaVA-1.5 (12-layer CLIP tower, 64 wide, 4 heads) at ``size`` px, sharpened, on the test device."""
    m = tiny.build_llava(image_size=size, seed=3)
    with torch.no_grad():
        for layer in encoder_layers(m.model.vision_tower):
            layer.self_attn.q_proj.weight.mul_(Q_SHARPEN)
    return m


def images(size: int, n: int = 2) -> torch.Tensor:
    """``n`` different images: smooth random blobs (each its own seed) plus a little noise."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        coarse = torch.randn(1, 3, 6, 6, generator=g)
        img = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        out.append(img + 0.2 * torch.randn(1, 3, size, size, generator=g))
    return torch.cat(out).to(tiny.DEVICE)


def prompts(size: int, n: int = 2):
    """(input_ids, attention_mask) of ``n`` prompts, one image each, left-padded."""
    return tiny.batch([tiny.prompt(n_patches=GEOMETRIES[size], text_after=(9, 10, 11)[: 1 + i % 3])
                       for i in range(n)])


@dataclass
class Layer:
    inputs: torch.Tensor  # (B, T, D) the layer's input hidden states ([CLS] first)
    q: torch.Tensor  # (B, heads, T, head_dim), unscaled
    k: torch.Tensor
    v: torch.Tensor
    attn: torch.Tensor  # (B, heads, T, T) softmax(q k^T * scale), eager
    outputs: torch.Tensor  # (B, T, D)


@dataclass
class Captured:
    layers: list[Layer]
    projected: torch.Tensor  # (B, N, D_lm): the projector applied to layer -2's patch tokens
    scale: float


def capture(m, pv) -> Captured:
    """Run the unpatched tower on ``pv`` and return every layer's tensors (float32)."""
    layers = encoder_layers(m.model.vision_tower)
    seen: dict[int, dict] = {i: {} for i in range(len(layers))}
    handles = []

    def keep(i, name):
        def hook(_mod, args, output):
            seen[i][name] = output.detach().float()
        return hook

    for i, layer in enumerate(layers):
        att = layer.self_attn
        for name, proj in (("q", att.q_proj), ("k", att.k_proj), ("v", att.v_proj)):
            handles.append(proj.register_forward_hook(keep(i, name)))
    try:
        with torch.no_grad():
            out = m.model.vision_tower(pv, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hidden = [h.float() for h in out.hidden_states]
    att = layers[0].self_attn
    heads, dim = att.num_heads, att.head_dim

    def split(x):
        b, t, _ = x.shape
        return x.view(b, t, heads, dim).transpose(1, 2)

    captured = []
    for i in range(len(layers)):
        q, k, v = split(seen[i]["q"]), split(seen[i]["k"]), split(seen[i]["v"])
        attn = torch.softmax(q @ k.transpose(-1, -2) * att.scale, dim=-1)
        captured.append(Layer(hidden[i], q, k, v, attn, hidden[i + 1]))
    with torch.no_grad():
        projected = m.model.multi_modal_projector(out.hidden_states[-2][:, 1:]).float()
    return Captured(captured, projected, att.scale)


def ours(m, size, method, n_images=2, **kw):
    """vlprune's records (``handle.last``) for ``method`` on the shared prompts and images."""
    ids, mask = prompts(size, n_images)
    with vlprune.pruned(m, method, **kw) as h:
        with torch.inference_mode():
            m(input_ids=ids, attention_mask=mask, pixel_values=images(size, n_images))
        return h.last


def ours_with_projector_input(m, size, method, **kw):
    """vlprune's records and the tokens that reach the projector (B, k, D), on the shared prompts and images."""
    seen = {}

    def grab(_mod, args):
        seen["x"] = args[0].detach().float()

    with vlprune.pruned(m, method, **kw) as h:
        hook = m.model.multi_modal_projector.register_forward_pre_hook(grab)  # after vlprune's: sees its output
        try:
            ids, mask = prompts(size)
            with torch.inference_mode():
                m(input_ids=ids, attention_mask=mask, pixel_values=images(size))
        finally:
            hook.remove()
        return h.last, seen["x"]


def assert_no_ties(scores: torch.Tensor, k: int, rel: float = 1e-4):
    """The k-th and (k+1)-th best scores of every row differ: a selection is decided by the data, not by ties."""
    top = scores.float().topk(k + 1, dim=-1).values
    gap = (top[:, k - 1] - top[:, k]).abs() / top[:, 0].abs().clamp_min(1e-12)
    assert (gap > rel).all(), f"near-tie at the budget boundary (relative gap {gap.min().item():.2e}); sharpen the tower"
