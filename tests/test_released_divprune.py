"""DivPrune against an independent re-implementation of its released code, on the same projected tokens.

vlprune's ``divprune`` (farthest-point greedy on cosine distances, ``vlprune/builtin_methods/divprune.py``) must
keep exactly the tokens the authors' greedy loop keeps, on the projected features of a sharpened tiny
LLaVA (576 and 256 patches, two different images, two budgets each). The released code runs on batch
row 0 of ``new_input_embeds`` only (batch size 1); the oracle runs it once per image, which is what
running the released code on each image alone does.
"""
import pytest
import torch

import released

#: the released code's budget is ``int(round(SUBSET_RATIO * N))`` kept tokens; two ratios per geometry
SUBSET_RATIOS = (0.098, 0.25)


def released_divprune(features: torch.Tensor, keep: int) -> torch.Tensor:
    """What the released DivPrune keeps of one image's projected tokens ``features`` (N, D): indices, ascending.

    Written from reading github.com/vbdi/divprune, ``LLaVA/llava/model/llava_arch.py`` at commit 799e2d9
    (lines 146-171, the pairwise cosine matrix and the greedy selection; lines 365-379, where it is called
    on the image's slice of the projected input embeddings and the picks are sorted back into sequence
    order). No code was copied; this follows its steps:

    - distances: one minus the cosine similarity of L2-normalised rows (no clamping);
    - first pick: for every token (column) the *second smallest* entry of its distance column - the
      smallest being its own ~0 diagonal - i.e. its nearest-neighbour distance; take the argmax;
    - later picks: restrict the matrix to the rows of the tokens picked so far, take each column's minimum
      (distance to the picked set) and the argmax. Picked tokens are not masked: their own row gives them
      ~0, so they lose to any token at a positive distance;
    - the picks are returned in pick order; the caller sorts the kept positions.

    ``torch.argmax`` returns the first maximal index, as in the released code.
    """
    unit = features / features.norm(dim=1, keepdim=True)
    dist = 1.0 - unit @ unit.t()
    picks: list[int] = []
    for i in range(keep):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            scores = dist[torch.tensor(picks, device=dist.device)].min(dim=0).values
        picks.append(int(torch.argmax(scores)))
    assert len(set(picks)) == keep, "the released loop picked a token twice (all remaining distances ~0)"
    return torch.tensor(sorted(picks))


def assert_decided_by_data(features: torch.Tensor, keep: int):
    """No pick of the greedy is decided by a rounding-level tie between two candidates.

    One tie is structural and allowed: the first pick's score is each token's nearest-neighbour distance,
    and two tokens that are each other's nearest neighbours share it exactly (the distance matrix is
    symmetric). Both codes then take the lower index (``argmax``'s first maximum); the test checks that.
    """
    unit = features / features.norm(dim=1, keepdim=True)
    dist = 1.0 - unit @ unit.t()
    n = len(dist)
    nn_dist, nn_idx = dist.masked_fill(torch.eye(n, dtype=torch.bool, device=dist.device), float("inf")).min(0)
    score, picks = nn_dist, []
    for step in range(keep):
        top = score.topk(2)
        a, b = top.indices.tolist()
        gap = float(top.values[0] - top.values[1]) / float(top.values[0])
        mutual = step == 0 and int(nn_idx[a]) == b and int(nn_idx[b]) == a
        assert gap > 1e-5 or mutual, f"near-tie at pick {step} (relative gap {gap:.1e}); sharpen the tower"
        picks.append(min(a, b) if mutual and gap <= 1e-5 else int(score.argmax()))
        chosen = torch.tensor(picks, device=dist.device)
        score = dist[chosen].min(0).values
        score[chosen] = -1.0
    return picks


@pytest.mark.parametrize("size", sorted(released.GEOMETRIES))
def test_divprune_keeps_what_the_released_code_keeps(size):
    m = released.model(size)
    captured = released.capture(m, released.images(size))
    n = released.GEOMETRIES[size]
    assert captured.projected.shape[1] == n
    for ratio in SUBSET_RATIOS:
        keep = int(round(ratio * n))
        ours = released.ours(m, size, "divprune", keep=keep)
        assert len(ours) == captured.projected.shape[0] == 2
        want_all = []
        for i, rec in enumerate(ours):
            feats = captured.projected[i]
            picks = assert_decided_by_data(feats, keep)  # no pick decided by rounding
            want = released_divprune(feats, keep)
            assert want.tolist() == sorted(picks)
            want_all.append(want.tolist())
            assert rec.kept.tolist() == want.tolist(), f"size {size}, keep {keep}, image {i}"
            # the records' scores (radii) hold the kept set as their top-k
            assert set(rec.scores.topk(keep).indices.tolist()) == set(want.tolist())
        assert want_all[0] != want_all[1]  # the two images select differently: the rows are not swapped unseen
