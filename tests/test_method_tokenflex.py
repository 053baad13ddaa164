"""tokenflex: adaptive-pooling cells plus a learned SwiGLU weighting (vlprune.builtin_methods.tokenflex), and
its training (vlprune.train.tokenflex). The shared contract (test_contract.py) runs it with a random block;
here: the pooling is adaptive_avg_pool2d's, an untrained block is exactly ``pool``, the block is what the
LM receives, the weights' checks, and a short training run that resumes to the uninterrupted result."""
import json

import pytest
import torch
import torch.nn.functional as F

import vlprune
from vlprune import learned
from vlprune.builtin_methods.tokenflex import centres, init_tensors, pooling, weigh
from vlprune.errors import VlpruneError
from tiny import DEVICE, batch, build_llava, feature_width, pixels, prompt


@pytest.fixture(scope="module")
def model():
    return build_llava().to(DEVICE)


def block(model, tmp_path, trained=True, seed=0, name="block"):
    base = learned.signature(model)
    g = torch.Generator().manual_seed(seed)
    t = init_tensors(feature_width(model), 8, g)
    if trained:
        t["down.weight"] = torch.randn(t["down.weight"].shape, generator=g) * 0.2
    return learned.save(tmp_path / name, "tokenflex", base, t)


def logits(model, method=None, **options):
    ids, mask = batch([prompt(), prompt(text_after=(9, 12))])
    kw = dict(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), pixel_values=pixels(2).to(DEVICE))
    if method is None:
        with torch.inference_mode():
            return model(**kw).logits
    with vlprune.pruned(model, method, **options), torch.inference_mode():
        return model(**kw).logits


@pytest.mark.parametrize("h,w,n", [(16, 16, 5), (16, 16, 8), (16, 16, 11), (24, 24, 12), (7, 9, 3)])
def test_square_counts_pool_exactly_as_adaptive_avg_pool2d(h, w, n):
    x = torch.randn(2, 6, h, w, dtype=torch.float64)
    want = F.adaptive_avg_pool2d(x, n).flatten(2).transpose(1, 2)  # (2, n*n, 6)
    got = pooling(h, w, n * n).double() @ x.flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    cells = pooling(h, w, n * n)
    for i, c in enumerate(centres(h, w, n * n)):  # each token stands for a patch its cell covers
        assert cells[i, c] > 0
    assert len(set(centres(h, w, n * n))) == n * n


def test_other_counts_use_pools_cells_and_keep_exactly_k(model, tmp_path):
    folder = block(model, tmp_path)
    with vlprune.pruned(model, "tokenflex", weights=str(folder), keep=6) as h:
        logits(model)
        with vlprune.pruned(model, "pool", keep=6) as p:
            logits(model)
        assert h.last[0].after == 6 and torch.equal(h.last[0].sources, p.last[0].sources)


def test_an_untrained_block_is_exactly_pool(model, tmp_path):
    folder = block(model, tmp_path, trained=False)
    assert torch.equal(logits(model, "tokenflex", weights=str(folder), keep=4), logits(model, "pool", keep=4))
    trained = block(model, tmp_path, name="trained")
    assert not torch.equal(logits(model, "tokenflex", weights=str(trained), keep=4), logits(model, "pool", keep=4))


def test_the_block_is_a_swiglu_residual_on_layer_normed_features():
    g = torch.Generator().manual_seed(1)
    p = init_tensors(6, 4, g)
    p["down.weight"] = torch.randn(6, 4, generator=g)
    x = torch.randn(3, 6, generator=g)
    z = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    want = x + (torch.nn.functional.silu(z @ p["gate.weight"].T) * (z @ p["up.weight"].T)) @ p["down.weight"].T
    torch.testing.assert_close(weigh(x, p), want, rtol=1e-5, atol=1e-5)


def test_weights_are_checked_before_any_call(model, tmp_path):
    with pytest.raises(VlpruneError, match="must be a folder with config.json and model.safetensors"):
        vlprune.patch(model, "tokenflex", weights=str(tmp_path / "nothing"), keep=4)
    other = build_llava(lm_layers=2)
    with pytest.raises(VlpruneError, match=r"differs from this model .* text_layers 2 \(model: 4\)"):
        vlprune.patch(model, "tokenflex", weights=str(block(other, tmp_path, name="other")), keep=4)
    with pytest.raises(VlpruneError, match="weights must be a path to a folder or None"):
        vlprune.patch(model, "tokenflex", weights=3, keep=4)
    folder = block(model, tmp_path, name="narrow")
    config, tensors = learned.load(folder, "tokenflex")
    learned.save(folder, "tokenflex", config["base"], {k: v[..., :5] if v.ndim == 2 else v[:5] for k, v in tensors.items()})
    with vlprune.pruned(model, "tokenflex", weights=str(folder), keep=4):
        with pytest.raises(VlpruneError, match="weight 5-wide features; this model's vision features are 64 wide"):
            logits(model)
    assert not hasattr(model, "_vlprune")


# -- training, on the embedded model and a few scenes' tower features ---------------------------------------
def test_training_resumes_to_the_uninterrupted_result_and_loads(features, tmp_path):
    from vlprune.train import main

    common = ["tokenflex", "--data", str(features), "--batch", "4", "--questions", "3", "--hidden", "8",
              "--val", "4", "--warmup", "2", "--save-every", "2", "--log-every", "1", "--eval-counts", "4,16"]
    assert main(common + ["--out", str(tmp_path / "whole"), "--steps", "4"]) == 0
    assert main(common + ["--out", str(tmp_path / "split"), "--steps", "4", "--counts", "4,16"]) == 0  # other counts
    part = tmp_path / "part"
    assert main(common + ["--out", str(part), "--steps", "4", "--stop-at", "2"]) == 0
    assert not (part / "model.safetensors").exists()
    assert main(common + ["--out", str(part), "--steps", "4"]) == 0
    log = (part / "train.log").read_text()
    assert "stopped at step 2 of 4" in log and "resumed at step 2" in log and "ETA" in log and "step 4/4" in log
    whole, resumed = learned.load(tmp_path / "whole", "tokenflex")[1], learned.load(part, "tokenflex")[1]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert whole["down.weight"].abs().sum() > 0  # it learned
    assert not torch.equal(whole["down.weight"], learned.load(tmp_path / "split", "tokenflex")[1]["down.weight"])
    trained = json.loads((part / "train_log.json").read_text())
    assert trained["counts"] == [25, 64, 121] and set(trained["validation"]) == {"4", "16"}
    model, _ = vlprune.load_embedded()
    vlprune.patch(model, "tokenflex", weights=str(part), keep=16).remove()


@pytest.mark.parametrize("flag,value,needle", [("--counts", "0,64", "--counts must be comma-separated token counts in 1..256"),
                                               ("--counts", "x", "--counts must be"), ("--steps", "0", "--steps must be >= 1")])
def test_bad_training_arguments_fail_before_the_model_loads(features, tmp_path, flag, value, needle):
    from vlprune.train import main

    with pytest.raises(VlpruneError, match=needle):
        main(["tokenflex", "--data", str(features), "--out", str(tmp_path / "o"), flag, value])


def test_missing_features_say_how_to_make_them(tmp_path):
    from vlprune.train import main

    with pytest.raises(VlpruneError, match="python -m vlprune.embedded.features --out"):
        main(["tokenflex", "--data", str(tmp_path), "--out", str(tmp_path / "o")])


def test_training_a_hugging_face_checkpoint_from_jsonl(tmp_path):
    """The recipe's path (eval/recipes/tokenflex-llava15.md) on a tiny random LLaVA checkpoint: the block
    trains through the patched model, tower included, and the result loads on it."""
    import eval_tiny
    from transformers import LlavaForConditionalGeneration

    from vlprune.train import main

    ckpt = eval_tiny.save_checkpoint(tmp_path / "ckpt")
    data = eval_tiny.write_prompts(tmp_path)
    out = tmp_path / "block"
    common = ["tokenflex", "--model", str(ckpt), "--data", str(data), "--hidden", "8", "--batch", "3",
              "--warmup", "1", "--log-every", "1", "--lr", "0.05"]
    with pytest.raises(VlpruneError, match="--counts must be comma-separated token counts in 1..16"):
        main(common + ["--out", str(tmp_path / "x"), "--counts", "4,64"])
    assert main(common + ["--out", str(out), "--steps", "3", "--counts", "1,4", "--eval-counts", "4,9"]) == 0
    config, tensors = learned.load(out, "tokenflex")
    assert tensors["down.weight"].abs().sum() > 0  # it learned: the zero-started output layer moved
    assert set(config["trained"]["validation"]) == {"4", "9"}
    model = LlavaForConditionalGeneration.from_pretrained(ckpt)
    with vlprune.pruned(model, "tokenflex", weights=str(out), keep=4):
        pass
    with pytest.raises(VlpruneError, match="--model needs --data FILE.jsonl"):
        main(["tokenflex", "--model", str(ckpt), "--data", str(tmp_path), "--out", str(tmp_path / "y")])
