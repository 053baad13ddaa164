"""FlowCut: progressive pruning inside the encoder, checked against a from-scratch eager re-derivation."""
import math

import pytest
import torch

import vlprune
from test_contract import LMInputs, run
from tiny import IMAGE_TOKEN, batch, pixels, prompt


def reference_flowcut(tower, pv, k, feature_layer, every=2, ema=0.5):
    """The paper's loop written out with full eager attention matrices (independent of vlprune's taps)."""
    h = tower.pre_layrnorm(tower.embeddings(pv))
    orig = torch.arange(h.shape[1] - 1)
    last = feature_layer - 1
    plan = set(range(last, -1, -every))
    cum = None
    for l, layer in enumerate(tower.encoder.layers[: feature_layer + 1]):
        attn = layer.self_attn
        x = layer.layer_norm1(h)
        b, t, _ = x.shape
        q, kk, v = (p(x).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
                    for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        probs = torch.softmax(q @ kk.transpose(-1, -2) * attn.scale, dim=-1)
        h = layer(h, None)
        if l not in plan:
            continue
        a = probs[:, :, 0, 1:].mean(1)
        a = a / a.sum(-1, keepdim=True)
        s = torch.softmax((v[:, :, :1] @ v.transpose(-1, -2)).squeeze(2) / math.sqrt(attn.head_dim), dim=-1)
        s = s[..., 1:].mean(1)
        s = s / s.sum(-1, keepdim=True)
        score = (a + s) * v[:, :, 1:].mean(1).abs().sum(-1)
        cum = score if cum is None else ema * cum + (1 - ema) * score
        n, target = t, k + 1
        if l == last:
            new = target
        else:
            entropy = float(-(a * a.log()).sum())
            new = max(n - round((n - target) / math.sqrt(last - l) * (1 - (entropy / math.log(n)) ** 2)), target)
        keep = cum[0].topk(new - 1).indices.sort().values
        h = torch.cat([h[:, :1], h[:, 1:][:, keep]], dim=1)
        orig, cum = orig[keep], cum[:, keep]
    return orig, h[:, 1:]


@pytest.mark.parametrize("k", [3, 8])
def test_flowcut_matches_eager_rederivation(llava_path, k):
    from tiny import load

    model = load(llava_path, attn_implementation="eager")
    tower = model.model.vision_tower
    pv = pixels(1)
    ids, mask = batch([prompt()])
    with torch.no_grad():
        want_idx, want_feats = reference_flowcut(tower, pv, k, feature_layer=len(tower.encoder.layers) - 2)
        want = model.model.multi_modal_projector(want_feats)[0]
    rec = LMInputs(model)
    try:
        with vlprune.pruned(model, "flowcut", keep=k) as h:
            run(model, ids, mask, pv)
    finally:
        rec.close()
    assert h.last[0].kept.tolist() == want_idx.tolist()
    start = int((ids[0] == IMAGE_TOKEN).nonzero()[0])
    torch.testing.assert_close(rec.calls[0]["embeds"][0, start : start + k], want, rtol=1e-4, atol=1e-5)


def test_later_encoder_layers_run_on_fewer_tokens(llava):
    lengths = []
    with vlprune.pruned(llava, "flowcut", keep=4):  # our hooks run after vlprune's pruning pre-hooks
        hooks = [layer.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
                 for layer in llava.model.vision_tower.encoder.layers]
        try:
            run(llava, *batch([prompt()]), pixels(1))
        finally:
            for hk in hooks:
                hk.remove()
    assert lengths[0] == lengths[1] == lengths[2] == 17  # layers 0..2 see everything (first prune after layer 1)
    assert all(a >= b for a, b in zip(lengths, lengths[1:]))
    assert lengths[10:] == [5, 5]  # the feature layer (10) and the last layer run on k + [CLS]


@pytest.mark.parametrize("bad,needle", [({"every": 0}, "every must be an int >= 1"), ({"ema": 1.0}, "ema must be in [0, 1)")])
def test_flowcut_bad_options(bad, needle):
    with pytest.raises(vlprune.VlpruneError) as err:
        vlprune.registry.get_method("flowcut").create(**bad)
    assert needle in str(err.value)
