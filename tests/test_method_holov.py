"""HoloV on hand-built tensors: crop layouts, the holistic score, known quotas, overflow redistribution."""
import pytest
import torch

import vlprune
from vlprune.builtin_methods.base import Context, Signal
from vlprune.builtin_methods.holov import allocate, crop_layout
from vlprune.registry import get_method

ATT = Signal("cls_attention", -2)
QUADRANTS = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]  # 4 crops of a 4 x 4 grid


def attention(values):
    """(1, 2, N) [CLS] rows whose head mean is exactly ``values`` (both heads equal)."""
    row = torch.tensor(values, dtype=torch.float32)
    return row.view(1, 1, -1).expand(1, 2, -1).clone()


def per_crop(values_by_crop, groups=QUADRANTS, n=16):
    out = [0.0] * n
    for group, values in zip(groups, values_by_crop):
        for t, v in zip(group, values):
            out[t] = v
    return out


def run(att_values, k, grid=(4, 4), seed=0, **options):
    n = grid[0] * grid[1]
    tokens = torch.randn(1, n, 6, generator=torch.Generator().manual_seed(seed))
    ctx = Context(grid=grid, signals={ATT: attention(att_values)})
    return get_method("holov").create(**options).select(tokens, k, ctx).indices[0].tolist()


def test_defaults_and_crop_counts():
    m = get_method("holov").create()
    assert (m.crops, m.alpha, m.tau, m.layer, m.crops_1d, m.reference_singleton_scale, m.stage) == (
        None, 0.09, 1.0, -2, False, False, "projector")
    assert m.signals() == [ATT]
    # int(1024 N / (576 k)) in [1, N]: the paper's floor(1024 / k) at N = 576, a function of k / N elsewhere
    assert [m.crops_for(k, 576) for k in (192, 128, 64, 7, 1)] == [5, 8, 16, 146, 576]
    assert [m.crops_for(k, 256) for k in (85, 57, 28, 7, 3, 1)] == [5, 7, 16, 65, 151, 256]
    assert [m.crops_for(k, 2880) for k in (320, 2880)] == [16, 1]  # LLaVA-NeXT-sized, and no pruning
    assert m.crops_for(4, 16) == 7 and m.crops_for(1, 16) == 16 and m.crops_for(16, 16) == 1
    assert get_method("holov").create(crops=16).crops_for(7, 256) == 16  # the released LLaVA code's count
    assert get_method("holov").create(crops=7).crops_for(64, 4) == 4


def test_crop_layouts_2d_rectangles_and_1d_runs():
    members, sizes = crop_layout(4, 4, 4, False)
    assert members.tolist() == QUADRANTS and sizes.tolist() == [4, 4, 4, 4]
    members, sizes = crop_layout(4, 4, 4, True)
    assert members.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    members, sizes = crop_layout(1, 10, 3, True)  # uneven: the first chunk is one longer, padded with N
    assert members.tolist() == [[0, 1, 2, 3], [4, 5, 6, 10], [7, 8, 9, 10]] and sizes.tolist() == [4, 3, 3]


def naive_scores(tokens, attn, groups, alpha):
    """Per-crop loop over the formula: attention + alpha * gamma_c * variance of cosine similarities."""
    out = torch.zeros(len(attn))
    for group in groups:
        x, a, m = tokens[group], attn[group], len(group)
        u = x / x.norm(dim=-1, keepdim=True)
        s = u @ u.T
        s.fill_diagonal_(0.0)
        mean = s.sum(1) / max(m - 1, 1)
        var = ((s - mean[:, None]) ** 2).sum(1) / max(m - 1, 1)  # the zeroed self-entry counts, as in the reference
        gamma = a.abs().mean() / var.abs().mean() if var.abs().mean() > 0 else 0.0
        out[group] = a + alpha * gamma * var
    return out


@pytest.mark.parametrize("crops_1d", [False, True])
def test_holistic_scores_match_the_formula(crops_1d):
    g = torch.Generator().manual_seed(0)
    tokens, att = torch.randn(2, 30, 8, generator=g), torch.rand(2, 2, 30, generator=g)
    m = get_method("holov").create(crops=4, crops_1d=crops_1d)
    sel = m.select(tokens, 6, Context(grid=(5, 6), signals={ATT: att}))
    members, sizes = crop_layout(5, 6, 4, crops_1d)
    groups = [row[:size].tolist() for row, size in zip(members, sizes)]
    for i in range(2):
        want = naive_scores(tokens[i], att[i].mean(0), groups, 0.09)
        torch.testing.assert_close(sel.scores[i], want, rtol=1e-5, atol=1e-6)
        # with gamma per crop, each crop's mean score is (1 + alpha) x its mean attention
        for group in groups:
            torch.testing.assert_close(sel.scores[i, group].mean(), 1.09 * att[i].mean(0)[group].mean())


def test_known_quotas_floors_then_leftovers_to_the_heaviest_crops():
    # crop mean attention 0.45 / 0.23 / 0.15 / 0.12 (sum 0.95): k = 8 -> 3.79, 1.94, 1.26, 1.01 -> floors
    # 3, 1, 1, 1 and the 2 leftovers to crops 0 and 1 -> quotas 4, 2, 1, 1
    att = per_crop([[0.45] * 4, [0.10, 0.30, 0.35, 0.17], [0.50, 0.02, 0.02, 0.06], [0.12] * 4])
    got = run(att, 8, crops=4)
    assert got == sorted([0, 1, 4, 5] + [3, 6] + [8] + [10])  # ties inside a crop: lowest index
    # a global top-8 by attention would take token 7 (0.17) instead of crop 3's token 10 (0.12)
    assert torch.tensor(att).topk(8).indices.sort().values.tolist() == [0, 1, 3, 4, 5, 6, 7, 8]


def test_overflow_is_redistributed_by_weight_to_exactly_k_real_tokens():
    # crop means 0.75 / 0.125 / 0.0625 / 0.0625: floors 6, 1, 0, 0 + leftover to crop 0 -> 7 > its 4 tokens;
    # the surplus 3 goes to crops 1..3 by weight (1.5, 0.75, 0.75 -> 1, 0, 0, then 1 each to crops 1 and 2)
    att = per_crop([[0.75] * 4, [0.125, 0.25, 0.0625, 0.0625], [0.0625] * 4, [0.0625, 0.125, 0.0, 0.0625]])
    got = run(att, 8, alpha=0.0, crops=4)  # alpha 0: exact dyadic weights (the quotas do not depend on alpha)
    assert got == sorted([0, 1, 4, 5] + [3, 2, 6] + [8])


def test_allocate_rounds():
    sizes = torch.tensor([4, 4, 4, 4])
    w = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    assert allocate(w, sizes, 5).tolist() == [[3, 1, 1, 0]]  # floors 2, 1, 1, 0; leftover to the heaviest
    w = torch.tensor([[0.7, 0.2, 0.1, 0.0]])
    assert allocate(w, sizes, 10).tolist() == [[4, 4, 2, 0]]  # one round: surplus 3 -> 2 and 1
    assert allocate(w, sizes, 12).tolist() == [[4, 4, 4, 0]]  # two rounds: crop 1 overflows in turn
    assert allocate(w, sizes, 16).tolist() == [[4, 4, 4, 4]]  # zero-weight crop filled last
    # unequal sizes, equal weights among the crops with room: ties go to the lower crop index
    assert allocate(torch.tensor([[0.8, 0.1, 0.1]]), torch.tensor([1, 5, 2]), 4).tolist() == [[1, 2, 1]]
    rows = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.4, 0.3, 0.2, 0.1]])
    assert allocate(rows, sizes, 12).tolist() == [[4, 4, 4, 0], allocate(rows[1:], sizes, 12)[0].tolist()]


def test_1d_crops_are_raster_runs():
    # crops = rows; row means 0.3, 0.3, 0.125, 0.125 (alpha 0 for exact ties): quotas 3, 3, 1, 1
    att = [0.375, 0.375, 0.125, 0.325, 0.375, 0.375, 0.25, 0.2, 0.0625, 0.1875, 0.125, 0.125, 0.125, 0.0, 0.25, 0.125]
    assert run(att, 8, alpha=0.0, crops=4, crops_1d=True) == [0, 1, 3, 4, 5, 6, 9, 14]


def test_reference_singleton_scale_starves_one_token_crops():
    # 1 x 5 raster in 3 runs of 2, 2, 1 tokens; crop means 0.125 / 0.075 / 0.6 (alpha 0)
    att = [0.1, 0.15, 0.05, 0.1, 0.6]
    assert run(att, 1, grid=(1, 5), alpha=0.0, crops=3, crops_1d=True) == [4]
    # the release scores crops of 2+ by attention x 1e3 but a one-token crop by its raw attention
    assert run(att, 1, grid=(1, 5), alpha=0.0, crops=3, crops_1d=True, reference_singleton_scale=True) == [1]
    # no one-token crop: the option changes nothing
    assert run(att, 2, grid=(1, 5), crops=2, crops_1d=True, reference_singleton_scale=True) == run(
        att, 2, grid=(1, 5), crops=2, crops_1d=True)


@pytest.mark.parametrize("grid", [(4, 4), (5, 5), (3, 7)])
def test_every_k_is_exact_and_batches_split(grid):
    n = grid[0] * grid[1]
    g = torch.Generator().manual_seed(n)
    tokens, att = torch.randn(3, n, 5, generator=g), torch.rand(3, 2, n, generator=g) ** 4
    for options in ({}, {"crops_1d": True}, {"crops": 3}):
        m = get_method("holov").create(**options)
        for k in range(1, n + 1):
            both = m.select(tokens, k, Context(grid, {ATT: att})).indices
            assert both.shape == (3, k)
            for i in range(3):
                assert both[i].tolist() == sorted(set(both[i].tolist()))
                assert torch.equal(m.select(tokens[i:i + 1], k, Context(grid, {ATT: att[i:i + 1]})).indices[0], both[i])


@pytest.mark.parametrize("options,needle", [
    ({"crops": 0}, "crops must be an int >= 1"),
    ({"crops": 2.5}, "crops must be an int >= 1"),
    ({"alpha": -0.1}, "alpha must be a finite number >= 0"),
    ({"alpha": float("inf")}, "alpha must be a finite number >= 0"),
    ({"tau": 0}, "tau must be a finite number > 0"),
    ({"layer": "-2"}, "layer must be an int"),
    ({"crops_1d": 1}, "crops_1d must be True or False"),
    ({"reference_singleton_scale": "yes"}, "reference_singleton_scale must be True or False"),
    ({"reference_singleton_scale": 0}, "reference_singleton_scale must be True or False"),
])
def test_bad_options(options, needle):
    with pytest.raises(vlprune.VlpruneError) as err:
        get_method("holov").create(**options)
    assert needle in str(err.value)


def test_batch_equals_singles_bit_for_bit_at_llava_size():
    g = torch.Generator().manual_seed(3)
    tokens, att = torch.randn(3, 576, 64, generator=g), torch.softmax(3 * torch.randn(3, 16, 576, generator=g), -1)
    m = get_method("holov").create()
    for k in (1, 64, 144, 575):
        sel = m.select(tokens, k, Context((24, 24), {ATT: att}))
        for i in range(3):
            one = m.select(tokens[i:i + 1], k, Context((24, 24), {ATT: att[i:i + 1]}))
            assert torch.equal(one.indices[0], sel.indices[i]) and torch.equal(one.scores[0], sel.scores[i])
