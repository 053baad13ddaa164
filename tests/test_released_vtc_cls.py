"""VTC-CLS against an independent re-implementation of its released code, on the same captured attention.

vlprune's ``vtc_cls`` (``vlprune/builtin_methods/vtc_cls.py``) must keep exactly the patches the authors' code
keeps, and its per-patch scores must be the summed score that code ranks by, on a sharpened tiny LLaVA
(576 and 256 patches, two different images, two budgets each).

Layer mapping: the released code sums the [CLS] rows of ``attentions[layer:-1]``, i.e. from its ``--layer``
argument up to and including the penultimate layer (the one whose output the projector receives).
vlprune's ``end_layer=-2`` is that fixed end; its ``start_layer`` is the released ``--layer``:

- default ``start_layer=-4``: ``--layer 20`` on CLIP ViT-L's 24 layers (layers 20, 21, 22, K = 3), which on
  the tiny tower's 12 layers is ``attentions[-4:-1]`` = layers 8, 9, 10;
- ``start_layer=-8``: the repo's argparse default ``--layer 16`` (seven layers 16..22 of 24) counted the same
  way from the end, layers 4..10 of the tiny tower;
- ``start_layer=6, end_layer=10``: an absolute ``--layer 6`` as the released code would index a 12-layer tower.

The default is checked at two budgets, the other two settings at one each (to keep the file short).
"""
import pytest
import torch

import released

#: (vlprune options, the released code's ``layer`` argument for the same tower, budgets)
SETTINGS = [
    ({}, -4, (64, 144)),
    ({"start_layer": -8, "end_layer": -2}, -8, (16,)),
    ({"start_layer": 6, "end_layer": 10}, 6, (64,)),
]


def released_vtc_cls(attentions: list[torch.Tensor], layer: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept indices ascending, summed per-patch score) of the released VTC-CLS for one image.

    ``attentions``: that image's softmax attention of every encoder layer, each (heads, 1 + N, 1 + N), [CLS]
    first, in the order of the HF ``attentions`` tuple; ``layer``: the released ``--layer`` (``start_layer``).

    Written from reading github.com/THU-MIG/VTC-CLS at commit e41ac9b:
    ``llava/model/multimodal_encoder/clip_encoder.py`` L318-L326 (for each attention map from index
    ``start_layer`` up to, not including, the last one: drop the batch axis, average the heads, keep the
    [CLS] query's row over the patch keys 1..N; add those rows up with equal weight) and
    ``llava/model/llava_arch.py`` L164-L176 (top-``token_num`` of the sum, then the picks are put back in
    their original positional order). The released code handles one image at a time (``squeeze(0)``);
    the oracle is run once per image. No code was copied.
    """
    rows = [a.mean(dim=0)[0, 1:] for a in attentions[layer:-1]]
    assert rows, "empty layer range"
    score = torch.stack(rows).sum(dim=0)
    picks = score.topk(keep).indices
    return picks.sort().values, score


@pytest.mark.parametrize("options,layer,budgets", SETTINGS, ids=["default", "argparse-default", "absolute"])
@pytest.mark.parametrize("size", sorted(released.GEOMETRIES))
def test_vtc_cls_keeps_what_the_released_code_keeps(size, options, layer, budgets):
    m = released.model(size)
    captured = released.capture(m, released.images(size))
    n = released.GEOMETRIES[size]
    attn = [layer_.attn for layer_ in captured.layers]
    assert len(attn) == 12 and attn[0].shape[-1] == n + 1
    for keep in budgets:
        ours = released.ours(m, size, "vtc_cls", keep=keep, **options)
        assert len(ours) == 2
        kept_sets = []
        for i, rec in enumerate(ours):
            want, score = released_vtc_cls([a[i] for a in attn], layer, keep)
            released.assert_no_ties(score.unsqueeze(0), keep)
            assert rec.kept.tolist() == want.tolist(), f"size {size}, keep {keep}, image {i}, {options}"
            torch.testing.assert_close(rec.scores.float().cpu(), score.cpu(), rtol=1e-4, atol=1e-6)
            kept_sets.append(want.tolist())
        assert kept_sets[0] != kept_sets[1]  # the two images select differently: rows are not swapped unseen


def test_settings_span_different_layers():
    """The three settings read different layer ranges, so each comparison above checks something of its own."""
    ranges = [list(range(12))[layer:-1] for _, layer, _ in SETTINGS]
    assert ranges == [[8, 9, 10], [4, 5, 6, 7, 8, 9, 10], [6, 7, 8, 9, 10]]
