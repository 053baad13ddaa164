"""PruMerge+ against an independent re-implementation of its released code, on the same captured tensors.

vlprune's ``prumerge_plus`` (``vlprune/builtin_methods/prumerge_plus.py``) must score, select and merge as the
authors' code does, up to the deviations its module docstring names, each a switch of the oracle:

- ``exactly_k``: always k tokens - the IQR outliers capped at k, or topped up with the centres of the
  outlier-free cells of ``grid_cells(h, w, k)`` (best score first) instead of the released raster stride;
- ``no_extra_token``: the released code appends one token, the attention-weighted sum of the pruned patches;
- ``raster_order``: the released order is outliers by score, then the stride samples;
- ``per_image_quartiles``: the released outlier rule takes the quartiles of all scores it is given (a
  batch, flattened); at the batch size of 1 the released code runs at, that is one image's;
- ``normalize``: vlprune divides each merged token by its total weight; ``normalize=False`` restores the
  released raw sum, and is tested against the oracle's raw behaviour.

With the switches on, the oracle must match vlprune's kept indices, merge weights (``sources``) and the
merged tokens that reach the projector. Without ``exactly_k`` (the released selection), the outliers and
every token both keep must agree, merged token for merged token. Tiny sharpened LLaVA (576 and 256
patches), two different images, budgets 64 and 144.
"""
from __future__ import annotations

import numpy as np
import pytest
import released
import torch

from vlprune.select import grid_cells

BUDGETS = (64, 144)
NEIGHBOURS = 32  # the released code's ``k=int(32)``


def full_width(t: torch.Tensor) -> torch.Tensor:
    """(heads, T, hd) -> (T, heads * hd): the projection's output before it is split into heads."""
    h, n, d = t.shape
    return t.permute(1, 0, 2).reshape(n, h * d)


def released_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The released [CLS] attention of one image: (N,), from the last layer's (heads, T, hd) q and k."""
    qf, kf = full_width(q), full_width(k)
    return torch.softmax(qf[0] @ kf.T * qf.shape[-1] ** -0.5, dim=-1)[1:]


def free_centres(a: torch.Tensor, outliers: list[int], grid, k: int) -> list[int]:
    """vlprune's top-up candidates: the centre patch (upper-left of the middle) of each cell of
    ``grid_cells(h, w, k)`` that holds no outlier, best score first."""
    h, w = grid
    free = []
    for r0, r1, c0, c1 in grid_cells(h, w, k):
        cell = {r * w + c for r in range(r0, r1) for c in range(c0, c1)}
        if not cell & set(outliers):
            free.append(((r0 + r1 - 1) // 2) * w + (c0 + c1 - 1) // 2)
    return sorted(free, key=lambda p: -float(a[p]))


def released_prumerge_plus(q, k, x, grid, *, neighbours: int = NEIGHBOURS, exactly_k: int | None = None,
                           no_extra_token: bool = False, raster_order: bool = False,
                           per_image_quartiles: bool = True, batch_scores: torch.Tensor | None = None,
                           normalize: bool = False):
    """What the released PruMerge+ outputs for one image: (patch indices, merge weights, merged tokens).

    Written from reading github.com/42Shawn/LLaVA-PruMerge at commit 097c041,
    ``llava/model/multimodal_encoder/clip_encoder.py``: lines 34-47 (the IQR outlier ratio), 73-81 (the
    features: ``hidden_states[-2]`` without [CLS]) and 174-281 (``token_prune_merge_advanced_plus``, called
    with ``if_adaptive=True`` at line 300). No code was copied. Inputs: ``q``, ``k`` (heads, T, hd) the
    last encoder layer's (the released hooks sit on ``layers[23]`` of 24) q_proj / k_proj outputs, unscaled;
    ``x`` (N, D) the patch features of layer -2's output; ``grid`` (h, w).

    Released steps:

    - score: one head over the full width D: ``softmax(q_cls . K^T / sqrt(D))`` over all T tokens, [CLS]
      included, then the N patch entries;
    - outliers: ratio = (# scores > Q3 + 1.5 (Q3 - Q1)) / (# scores), ``np.percentile`` quartiles of the
      flattened scores (float32 -> numpy); it keeps the ``int(N * ratio)`` best patches, best first;
    - top-up: ``s = int(int(1 / ratio) / 3)``; patches 0, s, 2s, ... below 575 (the hard-coded 576 - 1 of
      LLaVA-1.5's grid; here N - 1, so that 256 patches work too) that are not already kept are appended in
      that order;
    - merge, for each kept patch i: among all other N - 1 patches (other kept ones first, in kept order,
      then the rest ascending - only relevant to ties) the ``neighbours`` with the largest cosine
      similarity of full-width keys (patch keys only); output ``x_i + sum_j a_j x_j`` with ``a`` the score;
    - one extra token ``sum_j a_j x_j`` over the patches not kept is appended.

    Deviation switches (vlprune's documented departures): ``exactly_k=k``, ``no_extra_token``,
    ``raster_order``, ``per_image_quartiles`` (False: quartiles of ``batch_scores``, every image's scores
    flattened, as line 35 does on a batch), ``normalize`` (divide each merged token by ``1 + sum_j a_j``).

    Returns patch indices (-1 for the extra token), the (n_out, N) weight of each patch in each output
    and the (n_out, D) outputs.
    """
    n, dev = x.shape[0], x.device
    a = released_scores(q, k)
    flat = a if per_image_quartiles else batch_scores.flatten()
    vals = flat.float().cpu().numpy()
    q1, q3 = np.percentile(vals, 25), np.percentile(vals, 75)
    ratio = int((vals > q3 + 1.5 * (q3 - q1)).sum()) / vals.size
    top = a.topk(int(n * ratio)).indices  # best first

    if exactly_k is None:
        step = int(int(1 / ratio) / 3)
        extra = [p for p in range(0, n - 1, step) if p not in top.tolist()]
        kept = top.tolist() + extra
    elif top.numel() >= exactly_k:
        kept = a.topk(exactly_k).indices.tolist()
    else:
        kept = top.tolist() + free_centres(a, top.tolist(), grid, exactly_k)[: exactly_k - top.numel()]
    pruned = sorted(set(range(n)) - set(kept))

    # the merge of each kept patch, all at once (the released loop visits them one by one; its candidate
    # order only matters on ties, which the test excludes)
    unit = full_width(k)[1:]
    unit = unit / unit.norm(dim=-1, keepdim=True)
    at, rng = torch.tensor(kept, device=dev), torch.arange(len(kept), device=dev)
    sim = unit[at] @ unit.T  # (kept, N)
    sim[rng, at] = float("-inf")  # a patch is not among its own candidates
    near = sim.topk(neighbours, dim=1).indices  # (kept, neighbours)
    rows = torch.zeros(len(kept), n, device=dev).scatter_(1, near, a[near])
    outs = x[at] + rows @ x
    rows[rng, at] = 1.0
    if normalize:
        total = rows.sum(dim=1, keepdim=True)
        rows, outs = rows / total, outs / total
    rows, outs = list(rows), list(outs)
    indices = list(kept)
    if not no_extra_token:
        idx = torch.tensor(pruned, device=dev)
        rows.append(torch.zeros(n, device=dev).index_put_((idx,), a[idx]))
        outs.append((a[idx, None] * x[idx]).sum(dim=0))
        indices.append(-1)
    indices, rows, outs = torch.tensor(indices, device=dev), torch.stack(rows), torch.stack(outs)
    if raster_order:
        order = indices.argsort()
        indices, rows, outs = indices[order], rows[order], outs[order]
    return indices, rows, outs


def assert_decided_by_data(q, k, budget, grid):
    """No step of the selection is decided by a rounding-level tie."""
    a = released_scores(q, k)
    vals = a.cpu().numpy()
    q1, q3 = np.percentile(vals, 25), np.percentile(vals, 75)
    bound = q3 + 1.5 * (q3 - q1)
    assert np.abs(vals - bound).min() > 1e-5 * vals.max(), "a score sits on the outlier bound"
    outliers = int((vals > bound).sum())
    if outliers > budget:
        released.assert_no_ties(a[None], budget)
    else:  # the top-up takes the best free cell centres: no tie at its cut
        free = free_centres(a, a.topk(outliers).indices.tolist(), grid, budget)
        if len(free) > budget - outliers:
            released.assert_no_ties(a[free][None], budget - outliers)


def tied_neighbours(k) -> dict[int, set[int]]:
    """Patches whose ``NEIGHBOURS``-th and next most similar patches are within 1e-6 (a rounding-level tie):
    patch -> those two. A few exist in these towers; for them either one may be the last neighbour."""
    unit = full_width(k)[1:]
    unit = unit / unit.norm(dim=-1, keepdim=True)
    sim = unit @ unit.T
    sim.fill_diagonal_(-2.0)
    top = sim.topk(NEIGHBOURS + 1, dim=1)
    gap = top.values[:, NEIGHBOURS - 1] - top.values[:, NEIGHBOURS]
    return {p: set(top.indices[p, NEIGHBOURS - 1:].tolist()) for p in torch.nonzero(gap < 1e-6).flatten().tolist()}


def assert_rows_match(kept, got_rows, got_tokens, want_rows, want_tokens, ties, where):
    """Row by row: merge weights and merged tokens equal; for a patch with tied neighbours, only the tied
    pair may differ (its weights and token then are not compared)."""
    assert got_rows.shape == want_rows.shape and got_tokens.shape == want_tokens.shape, where
    tied = torch.tensor([p in ties for p in kept], device=got_rows.device)
    for j in torch.nonzero(tied).flatten().tolist():
        diff = set(torch.nonzero(got_rows[j]).flatten().tolist()) ^ set(torch.nonzero(want_rows[j]).flatten().tolist())
        assert diff <= ties[kept[j]], f"{where}: patch {kept[j]}"
    torch.testing.assert_close(got_rows[~tied].float(), want_rows[~tied], rtol=1e-5, atol=1e-6, msg=where)
    torch.testing.assert_close(got_tokens[~tied], want_tokens[~tied], rtol=1e-4, atol=1e-4, msg=where)
    assert len(set(kept) & set(ties)) <= 3, f"{where}: too many tied neighbourhoods to be a fair comparison"


def run_ours(m, size, keep, **options):
    return released.ours_with_projector_input(m, size, "prumerge_plus", keep=keep, **options)


DEVIATIONS = {"no_extra_token": True, "raster_order": True, "per_image_quartiles": True}


@pytest.mark.parametrize("size", sorted(released.GEOMETRIES))
def test_prumerge_plus_matches_the_released_code(size):
    m = released.model(size)
    cap = released.capture(m, released.images(size))
    last, feats = cap.layers[-1], cap.layers[-2].outputs[:, 1:]  # hooks on layers[23]; hidden_states[-2]
    n = released.GEOMETRIES[size]
    side = int(n ** 0.5)
    grid = (side, side)
    assert feats.shape[1] == n
    for keep in BUDGETS:
        ours, to_proj = run_ours(m, size, keep)
        raw, raw_to_proj = run_ours(m, size, keep, normalize=False)
        kept_sets = []
        for i in range(2):
            q, k, x = last.q[i], last.k[i], feats[i]
            where = f"size {size}, keep {keep}, image {i}"
            a = released_scores(q, k)
            assert (ours[i].scores.float() - a).abs().max() < 1e-6 * a.max(), where

            idx, rows, outs = released_prumerge_plus(q, k, x, grid, exactly_k=keep, normalize=True, **DEVIATIONS)
            assert_decided_by_data(q, k, keep, grid)
            ties = tied_neighbours(k)
            assert ours[i].kept.tolist() == idx.tolist(), where
            assert_rows_match(idx.tolist(), ours[i].sources, to_proj[i], rows, outs, ties, where)

            # normalize=False is the released raw sum, weights and tokens
            _, raw_rows, raw_outs = released_prumerge_plus(q, k, x, grid, exactly_k=keep, normalize=False,
                                                           **DEVIATIONS)
            assert raw[i].kept.tolist() == idx.tolist(), where
            assert_rows_match(idx.tolist(), raw[i].sources, raw_to_proj[i], raw_rows, raw_outs, ties, where)
            kept_sets.append(idx.tolist())

            # the released selection (adaptive count, raster stride, extra token, released order): its outliers
            # lead its list and are all kept by vlprune; every patch both keep is merged identically (raw)
            ref_idx, ref_rows, ref_outs = released_prumerge_plus(q, k, x, grid)
            assert ref_idx[-1] == -1  # the extra token
            vals = a.cpu().numpy()
            q1, q3 = np.percentile(vals, 25), np.percentile(vals, 75)
            outliers = set(np.nonzero(vals > q3 + 1.5 * (q3 - q1))[0].tolist())
            n_out = len(outliers)
            assert 0 < n_out < keep and set(ref_idx[:n_out].tolist()) == outliers
            assert outliers <= set(idx.tolist()), where
            both = sorted(set(ref_idx[:-1].tolist()) & set(idx.tolist()))
            assert len(both) >= n_out
            ours_at = [idx.tolist().index(p) for p in both]
            ref_at = [ref_idx.tolist().index(p) for p in both]
            assert_rows_match(both, raw[i].sources[ours_at], raw_to_proj[i][ours_at], ref_rows[ref_at],
                              ref_outs[ref_at], ties, where + " (released selection)")
        assert kept_sets[0] != kept_sets[1]  # two images select differently: rows are not swapped unseen

    # per-image quartiles are not idle here: the released rule given both images' scores (line 35 on a
    # batch) would choose other outliers
    batch = torch.stack([released_scores(last.q[i], last.k[i]) for i in range(2)])
    for i in range(2):
        args = (last.q[i], last.k[i], feats[i], grid)
        flat = released_prumerge_plus(*args, per_image_quartiles=False, batch_scores=batch)[0]
        assert flat.tolist() != released_prumerge_plus(*args)[0].tolist()

