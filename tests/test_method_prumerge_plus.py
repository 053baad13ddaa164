"""PruMerge+ on hand-built tensors: the full-width score, planted IQR outliers, grid top-up, merge weights."""
import math

import pytest
import torch

import vlprune
from vlprune.builtin_methods.base import Context, Signal
from vlprune.builtin_methods.prumerge_plus import PruMergePlus, full_width_cls_attention
from vlprune.registry import get_method

Q, K, KC = Signal("cls_query", -1), Signal("keys", -1), Signal("cls_key", -1)


def test_score_is_one_full_width_head_with_cls_key_in_the_softmax():
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    kc = torch.randn(2, 3, 4, generator=g)
    # heads concatenated the way the projection laid them out: head 0's dims first
    qf = torch.cat([q[:, h] for h in range(3)], dim=-1)                        # (2, 12)
    kf = torch.cat([torch.cat([kc[:, h : h + 1], keys[:, h]], dim=1) for h in range(3)], dim=-1)  # (2, 8, 12)
    want = torch.softmax(torch.einsum("bd,bnd->bn", qf, kf) / math.sqrt(12), dim=-1)
    got = full_width_cls_attention(q, keys, kc)
    torch.testing.assert_close(got, want[:, 1:])
    assert bool((got.sum(-1) < 1).all())  # the [CLS] key keeps its share


def planted_scores(**planted):
    scores = 1 + torch.arange(16.0) / 100  # token j: 1 + j/100
    for token, value in planted.items():
        scores[int(token[1:])] = value
    return scores.unsqueeze(0)


def test_iqr_outliers_then_free_cell_centres():
    # planted 5 -> 5.0, 9 -> 3.0; the other 14 sorted: 1.00 1.01 1.02 1.03 1.04 1.06 1.07 1.08 1.10 .. 1.15,
    # so Q1 = 1.0375, Q3 = 1.1325 and the bound Q3 + 1.5 * IQR = 1.275: outliers are exactly {5, 9}
    scores = planted_scores(t5=5.0, t9=3.0)
    # k = 4: cells are the 2x2 quadrants, centres 0, 2, 8, 10; 5 sits in quadrant 0, 9 in quadrant 2
    assert PruMergePlus.choose(scores, 4, (4, 4)).sort().values.tolist() == [[2, 5, 9, 10]]
    # k = 3: cells rows 0-1 x cols 0-1 (centre 0), rows 0-1 x cols 2-3 (centre 2), rows 2-3 (centre 9)
    assert PruMergePlus.choose(scores, 3, (4, 4)).sort().values.tolist() == [[2, 5, 9]]
    # more outliers than k: the top-k outliers
    assert PruMergePlus.choose(scores, 1, (4, 4)).tolist() == [[5]]
    more = planted_scores(t5=5.0, t9=3.0, t14=4.0)
    assert PruMergePlus.choose(more, 2, (4, 4)).sort().values.tolist() == [[5, 14]]
    # every k: outliers first, then centres of outlier-free cells, exactly k distinct
    for k in range(1, 17):
        kept = PruMergePlus.choose(scores, k, (4, 4))[0].tolist()
        assert len(set(kept)) == k
        if k >= 2:
            assert {5, 9} <= set(kept)


def test_top_up_prefers_higher_scored_free_centres():
    # outliers 4 and 5 share quadrant 0 (Q1 = 1.0525, Q3 = 1.1325, bound 1.2525): three free centres
    # 2 (1.02), 8 (1.08), 10 (1.10) for two places -> 8 and 10, not the first in raster order
    scores = planted_scores(t4=3.0, t5=5.0)
    assert PruMergePlus.choose(scores, 4, (4, 4)).sort().values.tolist() == [[4, 5, 8, 10]]


def signals_for(logit, direction, n=16):
    """q_cls = e7 * 4 (full width 8 = 2 heads x 4); key_j = direction_j + logit_j * e7, [CLS] key 0."""
    e = torch.eye(8)
    q = (4 * e[7]).view(1, 2, 4)
    full = torch.stack([e[direction[j]] + logit[j] * e[7] for j in range(n)])  # (n, 8)
    keys = full.view(n, 2, 4).permute(1, 0, 2).unsqueeze(0)                   # (1, 2, n, 4)
    return {Q: q, K: keys, KC: torch.zeros(1, 2, 4)}


def neighbourhood():
    """Token 5 is the only outlier; its key direction is shared only by tokens 1 and 6."""
    logit = [0.0] * 16
    logit[5] = 3.0
    direction = [2] * 16
    direction[5] = direction[1] = direction[6] = 0
    return signals_for(logit, direction)


@pytest.mark.parametrize("normalize", [True, False])
def test_merge_weights_on_a_known_neighbourhood(normalize):
    sig = neighbourhood()
    tokens = torch.randn(1, 16, 6, generator=torch.Generator().manual_seed(0))
    m = get_method("prumerge_plus").create(neighbours=2, normalize=normalize)
    sel = m.select(tokens, 4, Context(grid=(4, 4), signals=sig))
    order = sel.indices[0].argsort()
    idx, out, src = sel.indices[0][order], sel.tokens[0][order], sel.sources[0][order]
    assert idx.tolist() == [2, 5, 8, 10]  # outlier 5 (quadrant 0) + the centres of the other quadrants
    a = sel.scores[0]
    assert a[5] > 0.5 and torch.allclose(a[[1, 6]], a[0])
    row = torch.zeros(16)
    row[5], row[1], row[6] = 1.0, a[1], a[6]
    if normalize:
        row = row / (1 + a[1] + a[6])
    torch.testing.assert_close(src[1], row)
    torch.testing.assert_close(out[1], row @ tokens[0])
    assert bool((src[:, idx].diagonal() >= (0.5 if normalize else 1.0)).all())


def test_no_neighbours_keeps_tokens_as_they_are_and_all_neighbours_clip_to_n_minus_1():
    sig = neighbourhood()
    tokens = torch.randn(1, 16, 6)
    sel = get_method("prumerge_plus").create(neighbours=0).select(tokens, 4, Context(grid=(4, 4), signals=sig))
    assert torch.equal(sel.tokens[0], tokens[0, sel.indices[0]])
    sel = get_method("prumerge_plus").create(neighbours=100, normalize=False).select(
        tokens, 4, Context(grid=(4, 4), signals=sig))
    a = sel.scores[0]
    for i, t in enumerate(sel.indices[0].tolist()):
        torch.testing.assert_close(sel.sources[0, i].sum(), 1 + a.sum() - a[t])


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (1, 1), (2, 7)])
def test_exactly_k_for_every_k_and_batch_equals_singles(grid):
    n = grid[0] * grid[1]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, n, 5, generator=g)
    sig = {Q: 3 * torch.randn(3, 2, 4, generator=g), K: torch.randn(3, 2, n, 4, generator=g),
           KC: torch.randn(3, 2, 4, generator=g)}
    m = get_method("prumerge_plus").create(neighbours=3)
    for k in range(1, n + 1):
        sel = m.select(tokens, k, Context(grid=grid, signals=sig))
        assert sel.indices.shape == (3, k) and sel.tokens.shape == (3, k, 5) and sel.sources.shape == (3, k, n)
        for i in range(3):
            assert len(set(sel.indices[i].tolist())) == k
            one = m.select(tokens[i : i + 1], k, Context(grid=grid, signals={s: v[i : i + 1] for s, v in sig.items()}))
            assert torch.equal(one.indices[0], sel.indices[i]) and torch.equal(one.tokens[0], sel.tokens[i])
        torch.testing.assert_close(torch.bmm(sel.sources, tokens), sel.tokens)
        torch.testing.assert_close(sel.sources.sum(-1), torch.ones(3, k))


@pytest.mark.parametrize("options,needle", [
    ({"neighbours": -1}, "neighbours"), ({"neighbours": 2.5}, "int >= 0"), ({"neighbours": True}, "neighbours"),
    ({"normalize": "yes"}, "True, False"), ({"layer": "last"}, "layer"), ({"ratio_iqr": 2}, "allowed: neighbours"),
])
def test_bad_options(options, needle):
    with pytest.raises(vlprune.VlpruneError) as err:
        get_method("prumerge_plus").create(**options)
    assert needle in str(err.value)


def test_batch_equals_singles_bit_for_bit_at_llava_size():
    """24x24 patches, 16 heads: sizes where a batched matrix product can sum in another order."""
    g = torch.Generator().manual_seed(2)
    n, b = 576, 3
    tokens = torch.randn(b, n, 64, generator=g)
    sig = {Q: torch.randn(b, 16, 64, generator=g), K: torch.randn(b, 16, n, 64, generator=g),
           KC: torch.randn(b, 16, 64, generator=g)}
    m = get_method("prumerge_plus").create()
    for k in (1, 64, 144, 575):
        sel = m.select(tokens, k, Context(grid=(24, 24), signals=sig))
        for i in range(b):
            single = {s: v[i : i + 1] for s, v in sig.items()}
            one = m.select(tokens[i : i + 1], k, Context(grid=(24, 24), signals=single))
            assert torch.equal(one.indices[0], sel.indices[i])
            if sel.tokens is not None:
                assert torch.equal(one.tokens[0], sel.tokens[i]) and torch.equal(one.sources[0], sel.sources[i])
