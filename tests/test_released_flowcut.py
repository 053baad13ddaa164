"""FlowCut against a re-implementation of its released code, run layer by layer on the same tower.

The oracle follows ``TungChintao/FlowCut`` @ a2ecd24: ``flowcut/modeling_clip_flowcut.py``
L14-L97 (the attention's extra outputs: eager [CLS] row, softmax of [CLS]-value . values without
scaling, head-mean values), L137-L165 (after each layer, while tokens exceed the target: the running
score 0.5/0.5, a cut when the remaining-layer count is even, top (count - 1) patches re-sorted, [CLS]
kept), L174-L226 (remaining = select_layer - idx - 1, select_layer = layers - 2) and
``flowcut/utils_flowcut.py`` L20-L42 (the score (A + S) x L1(V), and the entropy-adaptive count with
log(number of patches), the largest count of a batch). Pruning is inside the encoder, so the oracle
runs the tower's layers itself on the shrinking sequence (eager attention) and compares its keep
sets and the projected survivors with vlprune's on the SDPA model.
"""
import math

import pytest
import torch

import released
from vlprune.patches._clip import encoder_layers


def oracle(tower, pv, k, every=2, scale_semantic=False, with_cls=False, batch_max=True, visible=None):
    """The released code's keep sets (B, k) and the feature-layer patch tokens (B, k, D).

    Switches for our named options: ``scale_semantic`` divides S's logits by sqrt(head_dim) (the
    paper's pseudocode), ``with_cls`` normalises the entropy by log(patches + 1). ``batch_max=False``
    gives every image its own count (our deliberate departure); the released code takes the largest.
    ``visible`` (patch indices): until the first cut only these are scored and counted (A renormalised
    over them, S's softmax over [CLS] and them), as vlprune does for a LLaVA-NeXT view's tokens that
    survive unpadding (the released code has no such case).
    """
    layers = encoder_layers(tower)
    feature_layer = len(layers) - 2
    h = tower.pre_layrnorm(tower.embeddings(pv))
    orig = torch.arange(h.shape[1] - 1).expand(h.shape[0], -1)
    target = k + 1  # with the [CLS] slot
    cum = None
    for idx, layer in enumerate(layers[: feature_layer + 1]):
        att = layer.self_attn
        x = layer.layer_norm1(h)
        b, t, _ = x.shape
        q, kk, v = (p(x).view(b, t, att.num_heads, att.head_dim).transpose(1, 2)
                    for p in (att.q_proj, att.k_proj, att.v_proj))
        probs = torch.softmax((q * att.scale) @ kk.transpose(-1, -2), dim=-1)
        sem_logits = v[:, :, :1] @ v.transpose(-1, -2)
        if scale_semantic:
            sem_logits = sem_logits / math.sqrt(att.head_dim)
        if visible is not None:  # S's softmax over [CLS] and the candidates only
            sem_logits = sem_logits[..., torch.cat([visible.new_zeros(1), visible + 1])]
        semantic = torch.softmax(sem_logits, dim=-1)[:, :, 0].mean(1)  # (B, T)
        v_mean = v.transpose(1, 2).mean(2)  # (B, T, head_dim)
        h = layer(h, None)
        remaining = feature_layer - idx - 1
        cols = slice(None) if visible is None else visible  # the candidates: all, or the visible until the first cut
        current = h.shape[1] if visible is None else len(visible) + 1
        if current <= target:
            continue
        a = probs[:, :, 0, 1:].mean(1)[:, cols]
        s = semantic[:, 1:]
        score = (a / a.sum(-1, keepdim=True) + s / s.sum(-1, keepdim=True)) * v_mean[:, 1:].abs().sum(-1)[:, cols]
        cum = score.clone() if cum is None else 0.5 * cum + 0.5 * score
        if remaining % every:
            continue
        if remaining:
            p = a / a.sum(-1, keepdim=True)
            n = p.shape[-1]
            ratio = -(p * p.log()).sum(-1) / math.log(n + 1 if with_cls else n)
            per_image = (n - (target - 1)) / remaining ** 0.5 * (1 - ratio ** 2)
            if batch_max:
                per_image = per_image.max().expand(b)
            drops = [int(r.round()) for r in per_image]
        else:
            drops = [current] * b
        counts = {max(current - d, target) for d in drops}
        assert len(counts) == 1, "a batch of different counts: run the images one at a time"
        keep = cum.topk(counts.pop() - 1, dim=1).indices.sort(dim=1).values
        cum = cum.gather(1, keep)
        if visible is not None:  # candidate positions -> patch positions
            keep, visible = visible[keep], None
        h = torch.cat([h[:, :1], h[:, 1:].gather(1, keep[..., None].expand(-1, -1, h.shape[-1]))], dim=1)
        orig = orig.gather(1, keep)
    return orig, h[:, 1:]


def per_image(tower, pv, k, **switches):
    """The oracle on each image alone (what our per-image counts promise for a batch)."""
    outs = [oracle(tower, pv[i : i + 1], k, **switches) for i in range(pv.shape[0])]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def projected_survivors(m, size, options, k):
    """Our records and the image features that reach the LM, for the shared two-image batch."""
    seen = []
    hook = m.model.multi_modal_projector.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        last = released.ours(m, size, "flowcut", keep=k, **options)
    finally:
        hook.remove()
    return last, torch.cat(seen)


CASES = [({}, {}), ({"scale_semantic": True}, {"scale_semantic": True}),
         ({"entropy_max": "tokens"}, {"with_cls": True}), ({"every": 3}, {"every": 3})]


@pytest.mark.parametrize("size", released.GEOMETRIES)
@pytest.mark.parametrize("k", [64, 16])
@pytest.mark.parametrize("options,switches", CASES, ids=["default", "scale_semantic", "entropy_tokens", "every3"])
def test_flowcut_selects_what_the_released_code_selects(size, k, options, switches):
    m = released.model(size)
    pv = released.images(size)
    tower = m.model.vision_tower
    with torch.no_grad():
        want_idx, want_feats = per_image(tower, pv, k, batch_max=False, **switches)
        want = m.model.multi_modal_projector(want_feats)
    last, got = projected_survivors(m, size, options, k)
    assert [r.kept.tolist() for r in last] == want_idx.tolist()
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-5)


def test_a_batch_keeps_per_image_counts_where_the_released_code_takes_the_largest():
    """The documented departure, shown on a batch whose images want different counts."""
    size, k = 336, 64
    m = released.model(size)
    pv = released.images(size)
    with torch.no_grad():
        batched, _ = oracle(m.model.vision_tower, pv, k, batch_max=True)
        alone, _ = per_image(m.model.vision_tower, pv, k)
    assert batched.tolist() != alone.tolist()  # these two images do want different counts
    assert [r.kept.tolist() for r in released.ours(m, size, "flowcut", keep=k)] == alone.tolist()
