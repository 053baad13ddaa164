"""FastV: image tokens leave the LM at decoder layer K, chosen by the last token's attention at K-1."""
import pytest
import torch

import vlprune
from test_contract import LMInputs, gen, run
from tiny import IMAGE_TOKEN, batch, load, pixels, prompt
from vlprune.builtin_methods.base import Context, Signal
from vlprune.registry import get_method


def test_fastv_formula_hand_built():
    row = torch.full((1, 2, 6), 0.01)
    row[0, 0, 3], row[0, 1, 3] = 0.2, 0.2   # mean 0.2
    row[0, 0, 1] = 0.3                       # mean 0.155
    row[0, 1, 5] = 0.25                      # mean 0.13
    sel = get_method("fastv").create(layer=3).select(torch.zeros(1, 6, 4), 2, Context(grid=(2, 3), signals={Signal("last_attention", 2): row}))
    assert sel.indices.tolist() == [[1, 3]]


def test_scores_are_the_eager_last_row_and_layers_from_k_are_short(llava_path):
    model = load(llava_path, attn_implementation="eager")
    ids, mask = batch([prompt(), prompt(text_before=(1, 3, 4, 4))])  # left padding in row 1
    pv = pixels(2)
    with torch.inference_mode():
        full = model(input_ids=ids, attention_mask=mask, pixel_values=pv, output_attentions=True,
                     output_hidden_states=True)
    k_layer = 2
    image = ids == IMAGE_TOKEN
    lengths = []
    with vlprune.pruned(model, "fastv", keep=5, layer=k_layer) as h:
        recs = [LMInputs(model, layer) for layer in range(4)]
        try:
            run(model, ids, mask, pv)
        finally:
            for r in recs:
                r.close()
    lengths = [r.calls[0]["embeds"].shape[1] for r in recs]
    L = ids.shape[1]
    assert lengths == [L, L, L - 11, L - 11]
    for i, rec in enumerate(h.last):
        want = full.attentions[k_layer - 1][i, :, -1][:, image[i]].mean(0)  # last token's row, head mean
        torch.testing.assert_close(rec.scores, want, rtol=1e-5, atol=1e-7)
        assert rec.kept.tolist() == want.topk(5).indices.sort().values.tolist()
        # what enters layer K is exactly the unpruned hidden state at the surviving positions
        keep = ~image[i]
        keep[image[i].nonzero().flatten()[rec.kept]] = True
        assert torch.equal(recs[k_layer].calls[0]["embeds"][i], full.hidden_states[k_layer][i][keep])


def test_positions_of_survivors_stay_original(llava):
    ids, mask = batch([prompt()])
    seen = []
    with vlprune.pruned(llava, "fastv", keep=4) as h:  # this hook runs after vlprune's, on what layer K gets
        hook = llava.model.language_model.layers[2].register_forward_pre_hook(
            lambda _m, _a, kw: seen.append(kw["position_embeddings"][0]), with_kwargs=True)
        try:
            gen(llava, ids, mask, pixels(1), max_new_tokens=2)
        finally:
            hook.remove()
    start, length = 3, ids.shape[1]
    want_pos = list(range(start)) + [start + int(i) for i in h.last[0].kept] + list(range(start + 16, length))
    rotary = llava.model.language_model.rotary_emb
    want_cos, _ = rotary(torch.zeros(1, 1, 64, device=ids.device), torch.tensor([want_pos + [length]], device=ids.device))
    assert torch.equal(seen[0][0], want_cos[0, :-1])  # prefill: survivors at their original positions
    assert torch.equal(seen[1][0, -1], want_cos[0, -1])  # first decode step continues at the prompt's length


@pytest.mark.parametrize("bad", [0, 4, 9])
def test_layer_out_of_range_is_clear(llava, bad):
    with pytest.raises(vlprune.VlpruneError) as err:
        vlprune.patch(llava, "fastv", ratio=0.5, layer=bad)
    assert f"layer={bad} is out of range" in str(err.value) and "4-layer LM" in str(err.value)
