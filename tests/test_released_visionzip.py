"""VisionZip against an independent re-implementation of its released code, on the same captured tensors.

vlprune's ``visionzip`` (``vlprune/builtin_methods/visionzip.py``) must keep the dominant patches and build the
contextual tokens exactly as the authors' code does, up to the deviations its module docstring names:

- ``patch_tokens_only``: the released code spends one of its ``dominant`` slots on the [CLS] token; ours
  hands over patch tokens only, so all ``k - c`` dominant slots are patches;
- ``raster_order``: the released code outputs [CLS] and the dominant patches in raster order followed by
  the contextual tokens; vlprune returns every token in raster order of the patch it stands for.

The oracle follows the released steps and applies each deviation behind a switch named after it. With
both switched on it must match vlprune's kept indices, merge weights (``sources``) and the merged tokens
that reach the projector; with the reference's [CLS] slot the difference must be exactly that slot.
Tiny sharpened LLaVA (576 and 256 patches), two different images, budgets 64 and 144.
"""
from __future__ import annotations

import pytest
import released
import torch

from vlprune.builtin_methods.visionzip import VisionZip

BUDGETS = (64, 144)
TIE_REL = 1e-5  # relative gap (to the top score) required at every selection boundary


def released_visionzip(attn, keys, hidden, dominant: int, contextual: int, *,
                       patch_tokens_only: bool = False, raster_order: bool = False):
    """What the released VisionZip outputs for one image: (token indices, merge weights, merged tokens).

    Written from reading github.com/dvlab-research/VisionZip at commit 3151f6d:
    ``visionzip/clip_encoder.py`` lines 43-83 (dominant selection, filtering, contextual merge and the
    output order), ``visionzip/utils.py`` lines 23-24 and 89 (the ``metric``: the layer's raw keys, before
    any scaling, averaged over heads) and ``visionzip/main.py`` line 7 (``dominant`` counts the [CLS]
    token: ``dominant - 1`` patches are chosen). No code was copied. Inputs are one image's tensors of the
    layer the released code reads (-2): ``attn`` (heads, T, T) softmax attention, ``keys`` (heads, T, hd)
    unscaled key projections, ``hidden`` (T, D) that layer's output (``hidden_states[-2]``), [CLS] = 0.

    Released steps:

    - score each patch by the [CLS] row of the attention summed over heads; take the ``dominant - 1``
      best patches and add [CLS];
    - the remaining tokens (raster order) are represented by their head-averaged keys scaled to unit
      length; ``contextual`` targets sit at positions 0, s, 2s, ... (``s = max(1, R // contextual)``, first
      ``contextual`` positions only); each other remaining token joins the target of largest dot product
      (first on ties, as argmax does);
    - a contextual token is the target's hidden state plus the mean hidden state of the tokens that joined
      it (the count clamped to at least 1, so just the target if none joined);
    - output: the dominant tokens ([CLS] included) in raster order, then the contextual tokens in target
      order.

    Deviation switches (vlprune's documented departures):

    - ``patch_tokens_only``: no [CLS] slot - all ``dominant`` slots are patches and [CLS] takes no part;
    - ``raster_order``: the outputs are sorted by the token each stands for.

    Returns indices into the T tokens (0 = [CLS], patch p = p + 1), a (n_out, T) weight matrix (row i: the
    coefficient of each token in output i) and the (n_out, D) outputs, computed as the released code does
    (target + sum / count), not through the weight matrix.
    """
    t = hidden.shape[0]
    patch_score = attn[:, 0, 1:].sum(dim=0)  # (N,)
    n_patches = dominant if patch_tokens_only else dominant - 1
    best = patch_score.topk(n_patches).indices + 1
    chosen = best if patch_tokens_only else torch.cat([torch.zeros(1, dtype=best.dtype, device=best.device), best])
    is_dominant = torch.zeros(t, dtype=torch.bool, device=hidden.device)
    is_dominant[chosen] = True
    if patch_tokens_only:
        is_dominant[0] = True  # [CLS] is not among the tokens at all: neither output nor contextual
    dom_idx = torch.nonzero(is_dominant).flatten()
    if patch_tokens_only:
        dom_idx = dom_idx[dom_idx != 0]
    remain = torch.nonzero(~is_dominant).flatten()  # raster order

    metric = keys.mean(dim=0)
    unit = metric[remain] / metric[remain].norm(dim=-1, keepdim=True)
    r = remain.numel()
    step = max(1, r // contextual)
    target_pos = torch.arange(0, r, step, device=hidden.device)[:contextual]
    is_target = torch.zeros(r, dtype=torch.bool, device=hidden.device)
    is_target[target_pos] = True
    member_pos = torch.nonzero(~is_target).flatten()
    sim = unit[member_pos] @ unit[target_pos].T  # (members, targets)
    joins = sim.argmax(dim=1)

    indices, rows, outs = [], [], []
    for i in dom_idx.tolist():
        row = torch.zeros(t, device=hidden.device)
        row[i] = 1.0
        indices.append(i)
        rows.append(row)
        outs.append(hidden[i])
    for c, pos in enumerate(target_pos.tolist()):
        tgt = int(remain[pos])
        group = remain[member_pos[joins == c]]
        count = max(1, group.numel())
        row = torch.zeros(t, device=hidden.device)
        row[group] = 1.0 / count
        row[tgt] = 1.0
        indices.append(tgt)
        rows.append(row)
        outs.append(hidden[tgt] + hidden[group].sum(dim=0) / count)
    indices = torch.tensor(indices, device=hidden.device)
    rows, outs = torch.stack(rows), torch.stack(outs)
    if raster_order:
        order = indices.argsort()
        indices, rows, outs = indices[order], rows[order], outs[order]
    return indices, rows, outs


def assignment_gaps(keys, dominant_patches: torch.Tensor, contextual: int) -> torch.Tensor:
    """For every contextual member: best minus second-best target similarity (so no join is a tie)."""
    t = keys.shape[1]
    rest = torch.ones(t, dtype=torch.bool, device=keys.device)
    rest[0] = False
    rest[dominant_patches + 1] = False
    remain = torch.nonzero(rest).flatten()
    metric = keys.mean(dim=0)[remain]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, remain.numel() // contextual)
    tp = torch.arange(0, remain.numel(), step, device=keys.device)[:contextual]
    mask = torch.ones(remain.numel(), dtype=torch.bool, device=keys.device)
    mask[tp] = False
    top2 = (unit[mask] @ unit[tp].T).topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def run_ours(m, size, keep, **options):
    return released.ours_with_projector_input(m, size, "visionzip", keep=keep, **options)


@pytest.mark.parametrize("size", sorted(released.GEOMETRIES))
def test_visionzip_matches_the_released_code(size):
    m = released.model(size)
    cap = released.capture(m, released.images(size))
    layer = cap.layers[-2]  # the released code reads attentions[-2], layers[-2].metric, hidden_states[-2]
    n = released.GEOMETRIES[size]
    assert layer.outputs.shape[1] == n + 1
    for keep in BUDGETS:
        n_dom, n_ctx = VisionZip().split(keep)
        assert n_dom + n_ctx == keep and n_ctx > 0
        records, to_projector = run_ours(m, size, keep)
        assert to_projector.shape == (2, keep, layer.outputs.shape[-1])
        kept_sets = []
        for i, rec in enumerate(records):
            attn, keys, hidden = layer.attn[i], layer.k[i], layer.outputs[i]
            score = attn[:, 0, 1:].sum(0)
            # vlprune's score equals the eager one to ~4e-7 of the top score (checked below, 1e-6); a boundary
            # gap of 1e-5 is then far from a rounding-level tie (336 px, keep 64, image 0 has 8.6e-5)
            released.assert_no_ties(score[None], n_dom, rel=TIE_REL)
            released.assert_no_ties(score[None], n_dom - 1, rel=TIE_REL)  # the reference's boundary ([CLS] slot)
            dom = score.topk(n_dom).indices
            assert assignment_gaps(keys, dom, n_ctx).min() > 1e-5, "a contextual join is decided by a tie"

            idx, rows, outs = released_visionzip(attn, keys, hidden, n_dom, n_ctx,
                                                 patch_tokens_only=True, raster_order=True)
            assert 0 not in idx.tolist()
            want = idx - 1  # token index -> patch index
            where = f"size {size}, keep {keep}, image {i}"
            assert rec.kept.tolist() == want.tolist(), where
            assert torch.allclose(rec.sources.float(), rows[:, 1:], atol=1e-6), where
            torch.testing.assert_close(to_projector[i], outs, rtol=1e-4, atol=1e-4, msg=where)
            # the record's scores are the released score (summed over heads) up to rounding
            assert (rec.scores.float() - score).abs().max() < 1e-6 * score.max()
            kept_sets.append(want.tolist())

            # the reference as released (a [CLS] slot): the same outputs but for that slot - its dominant
            # patches are ours minus our weakest, and it outputs [CLS] first
            ref_idx, ref_rows, ref_outs = released_visionzip(attn, keys, hidden, n_dom, n_ctx)
            assert ref_idx[0] == 0 and torch.equal(ref_outs[0], hidden[0])
            ref_dom = set((ref_idx[1:n_dom] - 1).tolist())
            assert ref_dom == set(dom[: n_dom - 1].tolist()) and ref_dom < set(want.tolist())
            # its raster-sorted dominant block is followed by the contextual tokens
            assert ref_idx[1:n_dom].tolist() == sorted(ref_idx[1:n_dom].tolist())
            assert ref_rows.shape == (keep, n + 1)
        assert kept_sets[0] != kept_sets[1]  # two images select differently: rows are not swapped unseen


def test_visionzip_split_is_the_readme_split():
    # README: ``visionzip(model, dominant=54, contextual=10)`` for 64 tokens; ours spends all 54 on patches
    assert VisionZip().split(64) == (54, 10)
