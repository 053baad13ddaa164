"""HoloV against an independent re-implementation of its released code, on the same projected tokens.

The oracle (``released_holov``) follows the authors' selection step by step on the projected features of
a sharpened tiny LLaVA (576 and 256 patches, two different images) and layer -2's head-mean [CLS]
attention. vlprune's ``holov`` departs from it on purpose in five documented ways (module docstring of
``vlprune/builtin_methods/holov.py``); the oracle has a switch for each one that changes a selection, and the
tests show both directions:

- with the options that restore the release (``crops_1d=True, reference_singleton_scale=True`` and the
  crop count as an explicit ``crops=``), vlprune keeps exactly what the released code keeps, in every
  case here where the released code does not zero-pad (checked: ``padded == 0``);
- with no options (the defaults), vlprune keeps exactly what the oracle keeps with the departures applied
  (2-D grid crops, one scale for one-token crops, surplus redistribution, the crop-count rule);
- a case where a crop overflows shows the release dropping the surplus (zero padding) while vlprune
  redistributes it: vlprune's keep set then holds all the release's real tokens and k in all.

Per-token holistic scores are compared too (the release's are 1e3 x ours in crops of 2+ tokens).
"""
import math

import pytest
import torch

import released
from vlprune.select import grid_cells

ALPHA = 0.09
ESP = 1e-6  # the release's epsilon (norms, the variance scale, the weight normaliser)


def paper_crops(n: int, k: int) -> int:
    """Our default crop count: int(1024 N / (576 k)), the authors' Qwen rule, in [1, N] (1024 // k at N = 576)."""
    return min(n, max(1, int(1024 * n / (576 * k))))


def raster_runs(n: int, crops: int) -> list[list[int]]:
    """The release's crops: ``crops`` consecutive runs of the raster, the first n % crops one token
    longer; empty runs (crops > n) are skipped."""
    size, longer = divmod(n, crops)
    runs, start = [], 0
    for c in range(crops):
        length = size + (c < longer)
        if length:
            runs.append(list(range(start, start + length)))
        start += length
    return runs


def grid_crops(height: int, width: int, crops: int) -> list[list[int]]:
    """Departure ``2-D crops``: vlprune's rectangles (``vlprune.select.grid_cells``), members in raster order."""
    return [[r * width + c for r in range(r0, r1) for c in range(c0, c1)]
            for r0, r1, c0, c1 in grid_cells(height, width, crops)]


def redistribute(quota: list[int], sizes: list[int], weights: list[float]) -> list[int]:
    """Departure ``exact k``: each round, quota above a crop's size is taken back and handed to the crops
    with room, floor(share x surplus) each with the share their weight among them, the remainder one
    token each to the largest shares (lower crop first on a tie); until nothing overflows."""
    quota = list(quota)
    while True:
        surplus = sum(max(q - s, 0) for q, s in zip(quota, sizes))
        if not surplus:
            return quota
        quota = [min(q, s) for q, s in zip(quota, sizes)]
        room = [c for c in range(len(quota)) if quota[c] < sizes[c]]
        total = sum(weights[c] for c in room)
        share = {c: (weights[c] / total if total > 0 else 1 / len(room)) for c in room}
        extra = {c: math.floor(share[c] * surplus) for c in room}
        for c in room:
            quota[c] += extra[c]
        for c in sorted(room, key=lambda c: (-share[c], c))[: surplus - sum(extra.values())]:
            quota[c] += 1


def released_holov(features, attention, k, crops, grid=None, same_scale=False, exact_k=False):
    """What the released HoloV keeps of one image: (kept positions in emission order, padding count, info).

    Written from reading github.com/obananas/HoloV at commit 1d2e65e (1d2e65e961e698ff0e7d5bb4625489177dd9deba):
    ``llava/model/utils.py`` lines 22-151 (the ``HoloV`` function), ``llava/model/llava_arch.py``
    lines 140-145 and 239 (head-mean [CLS] attention, the projector, the call with 16 crops and 64
    tokens) and ``llava/model/multimodal_encoder/clip_encoder.py`` lines 35-45 (layer -2's features and
    [CLS] row). No code was copied; the steps it takes, for ``features`` (N, D) projected tokens and
    ``attention`` (N,) head-mean [CLS] attention:

    - crops: consecutive raster runs, sizes differing by one (longer ones first), empty ones skipped;
    - a crop of one token scores its raw attention. A larger crop: cosine similarities (norm + 1e-6),
      diagonal set to 0, per token the mean over the other m - 1 and the sum over the whole row (the
      zeroed diagonal included) of squared deviations / (m - 1); token score 1e3 x attention + 0.09 x
      the variance rescaled to the crop's mean |1e3 x attention| (mean |variance| + 1e-6); crop score
      = mean token score;
    - weights = scores / (their sum + 1e-6); quota floor(w k); the shortfall one token each to the
      largest weights;
    - a crop with quota >= its size is kept whole (the excess is lost), else its top-quota tokens by
      attention; crop by crop; short outputs are zero-padded to k.

    Switches for vlprune's departures: ``grid=(h, w)`` 2-D crops, ``same_scale`` scores one-token crops
    x 1e3 like the rest, ``exact_k`` hands overflow on (``redistribute``). ``info`` holds the per-token
    scores, crop weights, quotas (before any redistribution) and crops, for the tie checks.
    """
    n = features.shape[0]
    groups = grid_crops(*grid, crops) if grid else raster_runs(n, crops)
    features, attention = features.double(), attention.double()
    token_scores = torch.zeros(n, dtype=torch.float64)
    crop_scores = []
    for group in groups:
        idx = torch.tensor(group)
        att = attention[idx]
        if len(group) == 1:
            score = att.mean() * (1e3 if same_scale else 1.0)
            token_scores[idx] = att
            crop_scores.append(score)
            continue
        x = features[idx]
        unit = x / (x.norm(dim=1, keepdim=True) + ESP)
        sim = unit @ unit.T
        sim = sim * (1 - torch.eye(len(group), dtype=sim.dtype))
        mean = sim.sum(1) / (len(group) - 1)
        var = ((sim - mean[:, None]) ** 2).sum(1) / (len(group) - 1)
        big = att * 1e3
        tok = big + ALPHA * var * (big.abs().mean() / (var.abs().mean() + ESP))
        token_scores[idx] = tok
        crop_scores.append(tok.mean())
    scores = torch.stack(crop_scores)
    weights = scores / (scores.sum() + ESP)
    quota = (weights * k).floor().long().tolist()
    short = k - sum(quota)
    for c in sorted(range(len(groups)), key=lambda c: -float(weights[c]))[:short]:
        quota[c] += 1
    sizes = [len(g) for g in groups]
    used = redistribute(quota, sizes, weights.tolist()) if exact_k else quota
    kept = []
    for group, q in zip(groups, used):
        if q >= len(group):
            kept += group
        elif q > 0:
            kept += [group[i] for i in attention[torch.tensor(group)].topk(q).indices.tolist()]
    info = {"token_scores": token_scores, "weights": weights, "quota": quota, "used": used, "groups": groups}
    return kept, k - len(kept), info


def assert_decided_by_data(info, attention, k, rel=1e-4):
    """No quota and no in-crop pick hangs on a rounding-level tie: w k not at a positive integer, the
    shortfall's last and next crop weights apart, and inside each partly kept crop the last kept and the
    first dropped attention apart."""
    weights = info["weights"]
    nearest = (weights * k).round()
    off = ((weights * k) - nearest).abs()
    assert ((off > rel) | (nearest == 0)).all(), "a crop's w k sits at a positive integer"  # (w >= 0: 0 is safe)
    short = k - int((weights * k).floor().sum())
    if 0 < short < len(weights):
        released.assert_no_ties(weights[None].float(), short, rel)
    for group, q in zip(info["groups"], info["used"]):
        if 0 < q < len(group):
            released.assert_no_ties(attention[torch.tensor(group)][None], q, rel)


def inputs(size):
    m = released.model(size)
    captured = released.capture(m, released.images(size))
    attention = captured.layers[-2].attn[:, :, 0, 1:].mean(1)  # (B, N) head mean of the [CLS] row
    side = math.isqrt(released.GEOMETRIES[size])
    assert captured.projected.shape[1] == side * side == attention.shape[1]
    return m, captured.projected.cpu(), attention.cpu(), (side, side)


def check_scores(rec, info):
    """vlprune's per-token scores are the release's / 1e3 in crops of 2+ tokens, equal in one-token crops."""
    scale = torch.ones_like(info["token_scores"])
    for group in info["groups"]:
        if len(group) > 1:
            scale[group] = 1e3
    torch.testing.assert_close(rec.scores.double().cpu() * scale, info["token_scores"], rtol=2e-4, atol=1e-7)


#: (keep, crops) run with the options that restore the release: its own LLaVA setting (64 tokens, 16
#: crops), a small budget at 16 crops, and at the paper's many crops (1024 // 7 = 146 > 256 / 2 gives
#: one-token crops at 256 patches, where the singleton scale decides)
RESTORED = [(64, 16), (7, 16), (7, 146)]
DEFAULT_KEEPS = (64, 7, 3)  # default crop rule: 16 / 146 / 341 crops at 576, 7 / 65 / 151 at 256


@pytest.mark.parametrize("size", sorted(released.GEOMETRIES))
@pytest.mark.parametrize("keep,crops", RESTORED)
def test_restored_options_keep_what_the_released_code_keeps(size, keep, crops):
    m, feats, attention, _ = inputs(size)
    ours = released.ours(m, size, "holov", keep=keep, crops=crops, crops_1d=True, reference_singleton_scale=True)
    assert len(ours) == feats.shape[0] == 2
    kept = []
    for i, rec in enumerate(ours):
        want, padded, info = released_holov(feats[i], attention[i], keep, crops)
        assert padded == 0, "the release zero-pads here; pick a budget without overflow"
        assert_decided_by_data(info, attention[i], keep)
        assert rec.kept.tolist() == sorted(want), f"size {size}, keep {keep}, crops {crops}, image {i}"
        check_scores(rec, info)
        kept.append(sorted(want))
    assert kept[0] != kept[1]  # the two images select differently: rows are not swapped unseen


@pytest.mark.parametrize("size", sorted(released.GEOMETRIES))
@pytest.mark.parametrize("keep", DEFAULT_KEEPS)
def test_defaults_are_the_release_with_the_documented_departures(size, keep):
    m, feats, attention, grid = inputs(size)
    n = feats.shape[1]
    crops = paper_crops(n, keep)
    ours = released.ours(m, size, "holov", keep=keep)
    kept = []
    for i, rec in enumerate(ours):
        want, padded, info = released_holov(feats[i], attention[i], keep, crops, grid=grid, same_scale=True,
                                            exact_k=True)
        assert padded == 0
        assert_decided_by_data(info, attention[i], keep)
        assert rec.kept.tolist() == sorted(want), f"size {size}, keep {keep}, crops {crops}, image {i}"
        check_scores(rec, info)
        kept.append(sorted(want))
    assert kept[0] != kept[1]


@pytest.mark.parametrize("crops_1d", [True, False])
def test_singleton_scale_decides_when_crops_exceed_half_the_tokens(crops_1d):
    """k = 7 at 256 patches with the paper's 146 crops: there are one-token crops, and the release's scale
    (raw attention there, x 1e3 elsewhere) changes the keep set; each of our settings matches its oracle."""
    size, keep, crops = 224, 7, 146
    m, feats, attention, grid = inputs(size)
    layout = None if crops_1d else grid
    changed = 0
    for scale in (False, True):
        ours = released.ours(m, size, "holov", keep=keep, crops=crops, crops_1d=crops_1d,
                             reference_singleton_scale=scale)
        for i, rec in enumerate(ours):
            want, _, info = released_holov(feats[i], attention[i], keep, crops, grid=layout,
                                           same_scale=not scale, exact_k=True)
            assert min(len(g) for g in info["groups"]) == 1
            assert_decided_by_data(info, attention[i], keep)
            assert rec.kept.tolist() == sorted(want), f"scale {scale}, image {i}"
            if not scale:
                other, _, _ = released_holov(feats[i], attention[i], keep, crops, grid=layout, exact_k=True)
                changed += sorted(other) != sorted(want)
    assert changed >= 1  # the option matters on this data


def test_overflow_release_pads_ours_redistributes():
    """A budget where a crop's quota exceeds its size: the release keeps the crop whole and zero-pads; vlprune
    (``crops_1d=True, reference_singleton_scale=True``) keeps all of the release's real tokens plus the
    surplus, redistributed by weight, and equals the oracle with ``exact_k``."""
    size, keep, crops = 224, 200, 16
    m, feats, attention, _ = inputs(size)
    ours = released.ours(m, size, "holov", keep=keep, crops=crops, crops_1d=True, reference_singleton_scale=True)
    for i, rec in enumerate(ours):
        release, padded, _ = released_holov(feats[i], attention[i], keep, crops)
        assert padded > 0
        assert len(release) == keep - padded
        assert set(release) <= set(rec.kept.tolist()) and len(rec.kept) == keep
        want, padded, _ = released_holov(feats[i], attention[i], keep, crops, exact_k=True)
        assert padded == 0
        assert rec.kept.tolist() == sorted(want)
