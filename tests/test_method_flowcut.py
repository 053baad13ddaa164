"""FlowCut: progressive pruning inside the encoder, its options; its selection against the released code is in
test_released_flowcut.py."""

import pytest

import vlprune
from test_contract import run
from tiny import batch, pixels, prompt


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


@pytest.mark.parametrize("bad,needle", [
    ({"every": 0}, "every must be an int >= 1"), ({"every": True}, "every must be an int >= 1"),
    ({"ema": 1.0}, "ema must be a number in [0, 1)"), ({"ema": "a"}, "ema must be a number in [0, 1)"),
    ({"scale_semantic": 1}, "scale_semantic must be True or False"),
    ({"entropy_max": "cls"}, "entropy_max must be one of 'patches', 'tokens'"),
])
def test_flowcut_bad_options(bad, needle):
    with pytest.raises(vlprune.VlpruneError) as err:
        vlprune.registry.get_method("flowcut").create(**bad)
    assert needle in str(err.value)
