"""atp (ATP-LLaVA): learned per-prompt thresholds prune image tokens at several LM layers. The shared contract
(test_contract.py) runs it with fresh modules at the default layers; here: the spatial grids and score
quantiles by hand, the first drop re-derived from the eager model's attention, the trainer's soft modules
reading the same scores as the patched model, the weights' checks, and a short training run that resumes
to the uninterrupted result."""
import json

import pytest
import torch

import vlprune
from vlprune import learned
from vlprune.builtin_methods.atp import (default_layers, init_tensors, modules, quantile_features, redundancy,
                                         spatial_scores, thresholds)
from vlprune.errors import VlpruneError
from tiny import DEVICE, IMAGE_TOKEN, batch, build_llava, load, pixels, prompt


def weights(model, tmp_path, layers=(2,), seed=0, name="atp"):
    """Modules with random (not initial) threshold networks, so thresholds differ per prompt."""
    g = torch.Generator().manual_seed(seed)
    t = init_tensors(list(layers), 8, g)
    for k in t:
        if k.endswith("w2"):
            t[k] = torch.randn(t[k].shape, generator=g) * 0.3
    return learned.save(tmp_path / name, "atp", learned.signature(model), t, lam=3.0)


def test_spatial_scores_rank_tokens_by_the_sparsest_grid_holding_them():
    s = spatial_scores((4, 4), 3.0).view(4, 4)
    assert s[0, 0] == 1 - 3 / 16 and s[0, 2] == s[2, 2] == 1 - 3 / 4 and s[1, 1] == s[0, 1] == 1 - 3
    assert [(s > t).sum().item() for t in (0.9, 0.5, 0.1)] == [0, 1, 4]  # a threshold picks a density
    assert (spatial_scores((16, 16), 3.0) > 0.9).sum() == 4  # stride 8 on a 16 x 16 grid


def test_quantiles_are_taken_over_the_alive_tokens_only():
    g = torch.Generator().manual_seed(0)
    scores, alive = torch.rand(3, 20, generator=g), torch.rand(3, 20, generator=g) > 0.4
    alive[2] = False
    got = quantile_features([scores], alive)
    for i in range(2):
        ranked = scores[i][alive[i]].sort().values
        at = [round(a * (len(ranked) - 1)) for a in torch.linspace(0, 1, got.shape[1]).tolist()]
        assert torch.equal(got[i], ranked[at])
    assert torch.equal(got[2], torch.zeros(got.shape[1]))  # an image with nothing left


def test_default_layers_follow_the_depth():
    assert default_layers(32) == [4, 14, 24] and default_layers(4) == [1, 2, 3] and default_layers(2) == [1]


@pytest.fixture(scope="module")
def eager(llava_path):
    return load(llava_path, attn_implementation="eager")


def inputs():
    ids, mask = batch([prompt(), prompt(text_before=(1, 3, 4, 4), text_after=(9, 10))])  # left padding in row 1
    return ids.to(DEVICE), mask.to(DEVICE), pixels(2)


def test_first_drop_is_the_eager_attention_rederived(eager, tmp_path):
    ids, mask, pv = inputs()
    with torch.inference_mode():
        full = eager(input_ids=ids, attention_mask=mask, pixel_values=pv, output_attentions=True)
    folder = weights(eager, tmp_path)
    module = {k: v.to(DEVICE) for k, v in modules(learned.load(folder, "atp")[1])[2].items()}
    with vlprune.pruned(eager, "atp", weights=str(folder)) as h, torch.inference_mode():
        eager(input_ids=ids, attention_mask=mask, pixel_values=pv)
    image = ids == IMAGE_TOKEN
    pos = torch.arange(ids.shape[1], device=DEVICE)
    kept_counts = []
    for i, rec in enumerate(h.last):
        att = full.attentions[1][i].mean(0)  # layer 1 (before the module at 2), head mean (L, L)
        cols = image[i].nonzero().flatten()
        text = pos > cols.max()
        own, cross = att[cols][:, cols].mean(0), att[text][:, cols].mean(0)
        alive = torch.ones(1, len(cols), dtype=torch.bool, device=DEVICE)
        score, feats = redundancy(own[None], cross[None], alive)
        theta_r, theta_s = thresholds(feats, module)
        want = ((score > theta_r) | (spatial_scores((4, 4), 3.0, DEVICE) > theta_s))[0]
        torch.testing.assert_close(rec.scores, score[0], rtol=1e-4, atol=1e-5)
        assert rec.kept.tolist() == want.nonzero().flatten().tolist() and rec.counts == {2: int(want.sum())}
        assert rec.layer == 2 and 0 < rec.after < 16
        kept_counts.append(rec.after)
    assert kept_counts[0] != kept_counts[1]  # per-prompt counts: the batch is ragged (fillers even it out)


def test_training_masks_read_the_scores_the_patched_model_prunes_by(eager, tmp_path):
    """The trainer's soft modules, on the unpatched model, see the same scores as inference at the first
    module; its hard threshold is the patched model's choice."""
    from vlprune.train.atp import SoftModules

    ids, mask, pv = inputs()
    folder = weights(eager, tmp_path, layers=(2, 3))
    tensors = {k: v.to(DEVICE) for k, v in learned.load(folder, "atp")[1].items()}
    with vlprune.pruned(eager, "atp", weights=str(folder)) as h, torch.inference_mode():
        eager(input_ids=ids, attention_mask=mask, pixel_values=pv)
        first = {r.row: r.counts[2] for r in h.last}
    layers = eager.model.language_model.layers
    soft = SoftModules(layers, [2, 3], modules(tensors), 3.0, 1e4)
    try:
        image = ids == IMAGE_TOKEN
        pos = torch.arange(ids.shape[1], device=DEVICE)
        soft.begin(image, (pos > torch.where(image, pos, -1).amax(1, keepdim=True)) & mask.bool(), (4, 4))
        with torch.inference_mode():
            eager(input_ids=ids, attention_mask=mask, pixel_values=pv)
        assert soft.seen[2].sum(1).tolist() == [first[0], first[1]]
        assert len(soft.shares) == len(layers) and soft.mean_share().shape == (2,)
    finally:
        soft.remove()


def test_weights_are_checked_before_any_call(tmp_path):
    model = build_llava().to(DEVICE)
    with pytest.raises(VlpruneError, match="must be a folder with config.json and model.safetensors"):
        vlprune.patch(model, "atp", weights=str(tmp_path / "nothing"))
    with pytest.raises(VlpruneError, match=r"differs from this model .* text_layers 2 \(model: 4\)"):
        vlprune.patch(model, "atp", weights=str(weights(build_llava(lm_layers=2), tmp_path, (1,), name="other")))
    with pytest.raises(VlpruneError, match=r"plans drops before decoder layers \[2, 4\], which do not fit a 4-layer LM"):
        vlprune.patch(model, "atp", weights=str(weights(model, tmp_path, (2, 4), name="deep")))
    with pytest.raises(VlpruneError, match="scale must be a number >= 0"):
        vlprune.patch(model, "atp", weights=str(weights(model, tmp_path)), scale=-1)
    assert not hasattr(model, "_vlprune")


def test_scale_trades_tokens_monotonically(llava, tmp_path):
    ids, mask, pv = inputs()
    folder = str(weights(llava, tmp_path, layers=(1, 2)))
    kept = []
    for scale in (0.0, 0.5, 1.0, 2.0):
        with vlprune.pruned(llava, "atp", weights=folder, scale=scale) as h, torch.inference_mode():
            llava(input_ids=ids, attention_mask=mask, pixel_values=pv)
            kept.append(sum(r.after for r in h.last))
    assert kept == sorted(kept, reverse=True) and kept[0] == 32 and kept[-1] < kept[0]


# -- training, on the embedded model and a few scenes' tower features ---------------------------------------
def test_training_resumes_to_the_uninterrupted_result_and_loads(features, tmp_path):
    from vlprune.train import main

    common = ["atp", "--data", str(features), "--batch", "4", "--hidden", "8", "--val", "4", "--warmup", "2",
              "--save-every", "2", "--log-every", "1", "--budget", "0.3"]
    assert main(common + ["--out", str(tmp_path / "whole"), "--steps", "4"]) == 0
    part = tmp_path / "part"
    assert main(common + ["--out", str(part), "--steps", "4", "--stop-at", "2"]) == 0
    assert not (part / "model.safetensors").exists()
    assert main(common + ["--out", str(part), "--steps", "4"]) == 0
    log = (part / "train.log").read_text()
    assert "stopped at step 2 of 4" in log and "resumed at step 2" in log and "ETA" in log and "step 4/4" in log
    whole, resumed = learned.load(tmp_path / "whole", "atp")[1], learned.load(part, "atp")[1]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    fresh = init_tensors([1, 2, 3], 8)
    assert not torch.equal(whole["modules.1.b2"], fresh["modules.1.b2"])  # it learned
    trained = json.loads((part / "train_log.json").read_text())
    assert trained["layers"] == [1, 2, 3] and 0 < trained["validation"]["mean_share"] <= 1
    model, _ = vlprune.load_embedded()
    vlprune.patch(model, "atp", weights=str(part)).remove()


@pytest.mark.parametrize("flag,value,needle", [("--layers", "0,2", "--layers must be ascending decoder layers in 1..3"),
                                               ("--layers", "3,2", "--layers must be"), ("--budget", "0", "--budget must be in"),
                                               ("--steps", "0", "--steps must be >= 1")])
def test_bad_training_arguments_fail_clearly(features, tmp_path, flag, value, needle):
    from vlprune.train import main

    with pytest.raises(VlpruneError, match=needle):
        main(["atp", "--data", str(features), "--out", str(tmp_path / "o"), flag, value])


def test_training_a_hugging_face_checkpoint_from_jsonl(tmp_path):
    """The recipe's path (eval/recipes/atp-llava15.md) on a tiny random LLaVA checkpoint."""
    import eval_tiny
    from transformers import LlavaForConditionalGeneration

    from vlprune.train import main

    ckpt = eval_tiny.save_checkpoint(tmp_path / "ckpt")
    eval_tiny.write_prompts(tmp_path)
    out = tmp_path / "modules"
    assert main(["atp", "--model", str(ckpt), "--data", str(tmp_path / "data.jsonl"), "--out", str(out),
                 "--steps", "3", "--batch", "3", "--hidden", "8", "--log-every", "1"]) == 0
    config, tensors = learned.load(out, "atp")
    assert sorted({k.split(".")[1] for k in tensors}) == ["1"]  # a 2-layer LM: one module, before layer 1
    assert 0 < config["trained"]["validation"]["mean_share"] <= 1
    model = LlavaForConditionalGeneration.from_pretrained(ckpt)
    vlprune.patch(model, "atp", weights=str(out)).remove()
    with pytest.raises(VlpruneError, match="--model needs --data FILE.jsonl"):
        main(["atp", "--model", str(ckpt), "--data", str(tmp_path), "--out", str(tmp_path / "x")])
