"""FasterVLM against an independent re-implementation of its released code, on the same captured attention.

vlprune's ``fastervlm`` (``vlprune/builtin_methods/fastervlm.py``) must keep exactly the patches the authors' code
keeps, and its per-patch scores must be the score that code ranks by, on a sharpened tiny LLaVA (576 and
256 patches, two different images, two budgets each).

Layer mapping: the released tower reads ``attentions[mm_vision_select_layer]`` with LLaVA-1.5's
``mm_vision_select_layer = -2`` (layer 22 of CLIP ViT-L's 24, the layer whose output the projector
receives). Counted from the end, that is layer 10 of the tiny tower's 12, which is what vlprune's default
``layer=-2`` reads; the oracle is handed the captured attention of that same layer.
"""
import pytest
import torch

import released

#: LLaVA-1.5's mm_vision_select_layer, as the released code indexes the attentions tuple
SELECT_LAYER = -2
BUDGETS = (64, 144)


def released_fastervlm(attn: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept indices ascending, per-patch score) of the released FasterVLM for one image.

    ``attn``: that image's softmax attention of the select layer, (heads, 1 + N, 1 + N), [CLS] first.

    Written from reading github.com/Theia-4869/FasterVLM at commit f5d5f12:
    ``llava/model/multimodal_encoder/clip_encoder.py`` L36-L47 (with ``select_feature == 'patch'`` the
    attention kept is row 0 - the [CLS] query - over key columns 1..N, per head) and
    ``llava/model/llava_arch.py`` L141-L157 (average over heads, top-``visual_token_num`` by that average,
    the indices set to True in a boolean mask of the N patches) and L242-L247 (features indexed by that
    mask, which leaves the kept patches in raster order). No code was copied.
    """
    cls_row = attn[:, 0, 1:]  # (heads, N): what [CLS] gives each patch
    score = cls_row.mean(dim=0)
    mask = torch.zeros(score.shape[0], dtype=torch.bool, device=score.device)
    mask[score.topk(keep).indices] = True
    return mask.nonzero().flatten(), score


@pytest.mark.parametrize("size", sorted(released.GEOMETRIES))
def test_fastervlm_keeps_what_the_released_code_keeps(size):
    m = released.model(size)
    captured = released.capture(m, released.images(size))
    n = released.GEOMETRIES[size]
    attn = captured.layers[SELECT_LAYER].attn
    assert attn.shape[-1] == n + 1
    for keep in BUDGETS:
        ours = released.ours(m, size, "fastervlm", keep=keep)
        assert len(ours) == attn.shape[0] == 2
        kept_sets = []
        for i, rec in enumerate(ours):
            want, score = released_fastervlm(attn[i], keep)
            released.assert_no_ties(score.unsqueeze(0), keep)
            assert rec.kept.tolist() == want.tolist(), f"size {size}, keep {keep}, image {i}"
            torch.testing.assert_close(rec.scores.float().cpu(), score.cpu(), rtol=1e-4, atol=1e-6)
            kept_sets.append(want.tolist())
        assert kept_sets[0] != kept_sets[1]  # the two images select differently: rows are not swapped unseen
