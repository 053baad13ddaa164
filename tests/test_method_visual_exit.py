"""visual_exit: every image token leaves the LM at one decoder layer, fixed or by attention mass."""
import pytest
import torch

import vlprune
from test_contract import LMInputs, gen, run
from tiny import IMAGE_TOKEN, batch, load, pixels, prompt


def layer_lengths(model, handle_kwargs, ids, mask, pv):
    with vlprune.pruned(model, "visual_exit", **handle_kwargs) as h:
        recs = [LMInputs(model, layer) for layer in range(len(model.model.language_model.layers))]
        try:
            run(model, ids, mask, pv)
        finally:
            for r in recs:
                r.close()
    return [r.calls[0]["embeds"].shape[1] for r in recs], h


def test_fixed_exit_defaults_to_the_middle_layer(llava):
    ids, mask = batch([prompt(), prompt(text_before=(1, 9, 9))])
    lengths, h = layer_lengths(llava, {}, ids, mask, pixels(2))
    L = ids.shape[1]
    assert lengths == [L, L, L - 16, L - 16]  # 4-layer LM: exit at layer 2
    assert all(r.after == 0 and r.kept.numel() == 0 for r in h.last)


def test_threshold_exit_follows_the_attention_mass(llava_path):
    model = load(llava_path, attn_implementation="eager")
    ids, mask = batch([prompt()])
    pv = pixels(1)
    with torch.inference_mode():
        attn = model(input_ids=ids, attention_mask=mask, pixel_values=pv, output_attentions=True).attentions
    image = ids[0] == IMAGE_TOKEN
    mass = [float(a[0, :, -1][:, image].sum(-1).mean()) for a in attn]  # per layer, head mean
    L = ids.shape[1]
    for threshold in sorted([m + 1e-4 for m in mass[:3]] + [min(mass) - 1e-3]):  # never on a tie
        # exit at the first layer l >= 1 whose previous layer's mass is below the threshold
        expected = next((l for l in range(1, 4) if mass[l - 1] < threshold), None)
        lengths, h = layer_lengths(model, {"layer": 1, "threshold": threshold}, ids, mask, pv)
        want = [L if expected is None or l < expected else L - 16 for l in range(4)]
        assert lengths == want, (threshold, mass)
        assert h.last[0].after == (16 if expected is None else 0)


def test_no_exit_is_the_unpruned_model(llava):
    ids, mask = batch([prompt()])
    pv = pixels(1)
    ref = run(llava, ids, mask, pv).logits
    with vlprune.pruned(llava, "visual_exit", layer=1, threshold=1e-12) as h:
        assert torch.equal(run(llava, ids, mask, pv).logits, ref)
        assert h.last[0].after == 16


def test_exit_generation_with_and_without_cache_agree(llava):
    ids, mask = batch([prompt(), prompt(text_before=(1, 4, 4, 4))])
    with vlprune.pruned(llava, "visual_exit", layer=1):
        assert torch.equal(gen(llava, ids, mask, pixels(2)), gen(llava, ids, mask, pixels(2), use_cache=False))


@pytest.mark.parametrize("kwargs,needle", [
    ({"ratio": 0.5}, "takes no ratio= or keep="), ({"keep": 3}, "takes no ratio= or keep="),
    ({"threshold": 1.5}, "threshold must be in (0, 1)"), ({"layer": 4}, "layer=4 is out of range"),
])
def test_bad_arguments(llava, kwargs, needle):
    with pytest.raises(vlprune.VlpruneError) as err:
        vlprune.patch(llava, "visual_exit", **kwargs)
    assert needle in str(err.value)
