"""HiPrune on hand-built tensors: planted anchors, their grid neighbours, deep-layer fill, exact k."""
import pytest
import torch

import vlprune
from vlprune.builtin_methods.base import Context, Signal
from vlprune.registry import get_method

OBJ, DEEP = Signal("attention_received", 8), Signal("attention_received", -2)


def scores(n, peaks, heads=2):
    """(1, heads, n) attention received: 0.01 everywhere, ``peaks`` {token: head-mean value}."""
    out = torch.full((1, heads, n), 0.01)
    for t, v in peaks.items():
        out[0, 0, t], out[0, 1, t] = v + 0.005, v - 0.005
    return out


def run(grid, k, obj_peaks, deep_peaks, **options):
    n = grid[0] * grid[1]
    sig = {OBJ: scores(n, obj_peaks), DEEP: scores(n, deep_peaks)}
    sel = get_method("hiprune").create(**options).select(torch.zeros(1, n, 3), k, Context(grid=grid, signals=sig))
    return sel.indices[0].tolist()


def test_defaults_and_anchor_counts():
    m = get_method("hiprune").create()
    assert (m.object_layer, m.deep_layer, m.alpha, m.reference_clamping, m.stage) == (8, -2, 0.1, False, "encoder")
    assert m.signals() == [OBJ, DEEP]
    assert [m.anchors_for(k) for k in (192, 128, 64, 4)] == [4, 3, 1, 0]  # as in the paper's budgets
    assert get_method("hiprune").create(object_layer=-2).signals() == [DEEP]


def test_planted_anchor_brings_its_four_neighbours_then_deep_fill():
    # 5 x 5 grid, anchor 12 (centre); deep layer prefers 0, 4, 20, 24, 3, 1 (not the neighbours)
    deep = {0: 0.9, 4: 0.8, 20: 0.7, 24: 0.6, 3: 0.5, 1: 0.4, 12: 0.95}
    got = run((5, 5), 10, {12: 0.9}, deep, alpha=0.5)  # round(10 * 0.5 / 5) = 1 anchor
    assert got == sorted({12, 7, 17, 11, 13} | {0, 4, 20, 24, 3})


@pytest.mark.parametrize("anchor,neighbours", [
    (0, {1, 5}),             # corner: 2 neighbours
    (2, {1, 3, 7}),          # top edge: 3
    (9, {4, 14, 8}),         # right edge: 3, and no wrap to 10 (next row's first patch)
    (20, {15, 21}),          # bottom-left corner
])
def test_grid_border_has_fewer_neighbours_and_no_row_wrap(anchor, neighbours):
    deep = {22: 0.9, 23: 0.8, 18: 0.7, 19: 0.6}  # fill comes from here, away from every anchor tested
    k = 5
    got = run((5, 5), k, {anchor: 0.9}, deep, alpha=1.0)  # round(5 / 5) = 1 anchor
    fill = [22, 23, 18, 19][: k - 1 - len(neighbours)]
    assert got == sorted({anchor} | neighbours | set(fill))


def test_reference_clamping_wraps_rows_and_collapses_onto_border_tokens():
    # anchor 4 = top-right corner of 5 x 5: on the grid its neighbours are 3 and 9; the reference's
    # flat +-1/+-5 clamped to [0, 24] gives 3, 5 (wrapped to the next row), 0 (clamped -1) and 9
    deep = {22: 0.9, 23: 0.8, 18: 0.7}
    assert run((5, 5), 5, {4: 0.9}, deep, alpha=1.0) == sorted({4, 3, 9, 22, 23})
    assert run((5, 5), 5, {4: 0.9}, deep, alpha=1.0, reference_clamping=True) == [0, 3, 4, 5, 9]
    # corner 0: -1 and -5 both clamp onto the anchor itself, so only 1 and 5 are added
    assert run((5, 5), 5, {0: 0.9}, deep, alpha=1.0, reference_clamping=True) == sorted({0, 1, 5, 22, 23})


def test_exact_k_when_anchors_and_buffers_overflow():
    # 6 x 6, alpha 1, k 8: round(1.6) = 2 anchors (7 strongest, then 28) with 8 neighbours, room for 6:
    # the strongest anchor's four (up 1, down 13, left 6, right 8), then 28's up (22) and down (34)
    got = run((6, 6), 8, {7: 0.9, 28: 0.8}, {35: 0.9}, alpha=1.0)
    assert got == sorted({7, 28, 1, 13, 6, 8, 22, 34})
    # k 3: one anchor, room for two neighbours: up and down
    assert run((6, 6), 3, {14: 0.9}, {35: 0.9}, alpha=1.0) == [8, 14, 20]
    # the neighbour shared by two anchors counts once, with the stronger anchor's priority
    got = run((6, 6), 9, {14: 0.9, 21: 0.8}, {35: 0.9}, alpha=1.0)  # round(1.8) = 2 anchors, room 7
    # 14: up 8, down 20, left 13, right 15; 21: up 15 (taken), down 27, left 20 (taken), right 22
    assert got == sorted({14, 21, 8, 20, 13, 15, 27, 22, 35})


def test_alpha_zero_is_deep_top_k_and_every_k_is_exact():
    g = torch.Generator().manual_seed(0)
    sig = {OBJ: torch.rand(3, 2, 20, generator=g), DEEP: torch.rand(3, 2, 20, generator=g)}
    tokens = torch.zeros(3, 20, 2)
    sel = get_method("hiprune").create(alpha=0.0).select(tokens, 6, Context((4, 5), sig))
    assert torch.equal(sel.indices, sig[DEEP].mean(1).topk(6).indices.sort().values)
    for clamp in (False, True):
        m = get_method("hiprune").create(alpha=1.0, reference_clamping=clamp)
        for k in range(1, 21):
            both = m.select(tokens, k, Context((4, 5), sig)).indices
            assert both.shape == (3, k)
            for i in range(3):
                assert both[i].tolist() == sorted(set(both[i].tolist()))
                one = m.select(tokens[i:i + 1], k, Context((4, 5), {s: v[i:i + 1] for s, v in sig.items()})).indices
                assert torch.equal(one[0], both[i])


@pytest.mark.parametrize("options,needle", [
    ({"alpha": 1.5}, "alpha must be a number in [0, 1]"),
    ({"alpha": -0.1}, "alpha must be a number in [0, 1]"),
    ({"alpha": "0.1"}, "alpha must be a number in [0, 1]"),
    ({"object_layer": 8.0}, "object_layer must be an int"),
    ({"deep_layer": None}, "deep_layer must be an int"),
    ({"reference_clamping": "yes"}, "reference_clamping must be True or False"),
])
def test_bad_options(options, needle):
    with pytest.raises(vlprune.VlpruneError) as err:
        get_method("hiprune").create(**options)
    assert needle in str(err.value)
