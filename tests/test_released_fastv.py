"""FastV against an independent re-implementation of its released code, on the same LM attention.

vlprune's ``fastv`` drops image tokens at decoder layer K (default 2) ranked by the last prompt token's
head-mean attention at layer K-1 (``vlprune/builtin_methods/fastv.py``, row computed in ``patches/_llm.py``
from that layer's q/k). The oracle takes the attention of layer K-1 from an *unpatched* run of the same
tiny LLaVA with eager attention and ``output_attentions`` (the tensor the released code reads,
``layer_outputs[1]``), and ranks it as the released code does. Both rows of a left-padded batch whose
prompts differ in length are checked, for 576 and 256 patches, two budgets and two layers K. The
released code runs one prompt at a time (batch row 0, no padding); a second oracle input, each prompt
run alone and unpadded, checks that the batch's padding does not change the choice.
"""
import pytest
import torch

import released
import tiny

#: FastV's R (fraction of image tokens dropped); the released code keeps round(N * (1 - R))
RATIOS = (0.5, 0.75)
#: a boundary counts as decided by the data when its relative gap exceeds this. The random LM spreads the
#: last token's attention over hundreds of image tokens (a few 1e-3 each), so released.assert_no_ties'
#: default 1e-4 is too coarse; vlprune's recomputed row differs from the eager one by ~3e-7 (relative to
#: the top score), which the test asserts stays below TIE_REL / 10.
TIE_REL = 1e-5


def released_fastv(attention: torch.Tensor, image_start: int, image_length: int, keep: int):
    """The image tokens the released FastV keeps, from one prompt's layer K-1 attention (1, heads, L, L).

    Written from reading github.com/pkunlp-icler/FastV,
    ``src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py`` at commit d165972
    (lines 1033-1064: the prefill branch of the in-place pruning at ``layer_idx == FASTV_k``; lines
    1105-1120: attentions are returned by layer K-1 only). The older in-place variant in
    ``src/transformers/src/transformers/models/llama/modeling_llama.py`` (lines 731-758) ranks the same
    way. No code was copied; its steps:

    - head mean of the layer's attention, batch row 0;
    - the row of the last sequence position (the last prompt token);
    - its columns over the image span ``[start, start + length)``;
    - top-``round(length * (1 - R))`` of those (here ``keep``), shifted back to sequence positions, sorted
      together with the text positions.

    Returns (kept image-token indices, ascending; the head-mean scores over the image span).
    """
    row = attention.mean(dim=1)[0][-1]
    image_scores = row[image_start:image_start + image_length]
    top = image_scores.topk(keep).indices + image_start
    kept_positions = top.sort().values
    return kept_positions - image_start, image_scores


def eager_attentions(m, ids, mask, pv):
    """Per-layer attention probabilities of the unpatched model with eager attention (restored afterwards)."""
    before = m.config._attn_implementation
    m.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = m(input_ids=ids, attention_mask=mask, pixel_values=pv, output_attentions=True)
    finally:
        m.set_attn_implementation(before)
    assert m.config._attn_implementation == before
    return [a.float() for a in out.attentions]


def image_span(ids_row):
    pos = (ids_row == tiny.IMAGE_TOKEN).nonzero().flatten()
    assert len(pos) and bool((pos.diff() == 1).all())  # one contiguous image block
    return int(pos[0]), len(pos)


@pytest.mark.parametrize("size", sorted(released.GEOMETRIES))
def test_fastv_keeps_what_the_released_code_keeps(size):
    m = released.model(size)
    ids, mask = released.prompts(size)
    pv = released.images(size)
    n = released.GEOMETRIES[size]
    assert (mask == 0).any() and (mask.sum(1)[0] != mask.sum(1)[1])  # left padding, different lengths
    batch_att = eager_attentions(m, ids, mask, pv)
    assert len(batch_att) == 4  # the tiny LM's 4 layers
    # the released code's setting: each prompt alone, no padding
    alone_att = []
    for i in range(2):
        real = mask[i].bool()
        alone_att.append(eager_attentions(m, ids[i:i + 1, real], mask[i:i + 1, real], pv[i:i + 1]))
    for k_layer, ratios in ((2, RATIOS), (3, RATIOS[:1])):
        for ratio in ratios:
            keep = round(n * (1 - ratio))
            ours = released.ours(m, size, "fastv", keep=keep, layer=k_layer)
            assert len(ours) == 2
            kept_rows = []
            for i, rec in enumerate(ours):
                assert rec.row == i
                start, length = image_span(ids[i])
                assert length == n
                want, scores = released_fastv(batch_att[k_layer - 1][i:i + 1], start, length, keep)
                released.assert_no_ties(scores.unsqueeze(0), keep, rel=TIE_REL)
                where = f"size {size}, K {k_layer}, keep {keep}, row {i}"
                assert rec.kept.tolist() == want.tolist(), where
                err = (rec.scores.float() - scores).abs().max() / scores.max()
                assert err < TIE_REL / 10, f"{where}: scores differ by {err:.1e} (relative to the top)"
                # the same choice when the prompt runs alone and unpadded, as the released code runs it
                start1, _ = image_span(ids[i][mask[i].bool()])
                want1, _ = released_fastv(alone_att[i][k_layer - 1], start1, length, keep)
                assert want1.tolist() == want.tolist(), where
                kept_rows.append(want.tolist())
            assert kept_rows[0] != kept_rows[1], "both rows chose alike: a row mix-up would go unseen"
