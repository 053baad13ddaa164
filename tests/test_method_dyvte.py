"""dyvte: learned exit gates (vlprune.builtin_methods.dyvte), their weights (vlprune.learned) and training
(vlprune.train.dyvte). The shared contract (test_contract.py) runs it with gates that always exit; here the
gate itself: its votes from the layer's input, the exit layer they give alone and in a batch, the weights'
checks, and a short training run that resumes."""
import json

import pytest
import torch

import vlprune
from vlprune import learned
from vlprune.builtin_methods.dyvte import gate_tensors
from vlprune.errors import VlpruneError
from tiny import DEVICE, batch, build_llava, learned_options, pixels, prompt


@pytest.fixture(scope="module")
def model():
    return build_llava(lm_layers=4).to(DEVICE)


def gates(model, tmp_path, hidden=8, seed=0, name="gates"):
    """A weights folder for ``model`` with freshly initialised gates (seeded)."""
    base = learned.signature(model)
    t = gate_tensors(base["text_hidden_size"], hidden, range(1, base["text_layers"]), torch.Generator().manual_seed(seed))
    return learned.save(tmp_path / name, "dyvte", base, t)


def run(model, ids, mask, pv):
    with torch.inference_mode():
        return model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), pixel_values=pv.to(DEVICE))


def expected_votes(model, ids, mask, pv, method):
    """Per row, per layer 1..depth-1: the gate's vote on the unpatched model's input of that layer, from the
    text tokens after the image (mean) and the last token, computed here independently of the patcher."""
    with torch.inference_mode():
        out = model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), pixel_values=pv.to(DEVICE),
                    output_hidden_states=True)
    image = ids == model.config.image_token_id
    votes = {}
    for layer in range(1, model.config.text_config.num_hidden_layers):
        h = out.hidden_states[layer].float().cpu()
        rows = []
        for r in range(ids.shape[0]):
            last_image = int(image[r].nonzero().max())
            text = [j for j in range(last_image + 1, ids.shape[1] - 1) if mask[r, j]]
            mean = h[r, text].mean(0) if text else torch.zeros(h.shape[-1])
            rows.append(method.exit_votes(layer, mean[None].to(DEVICE), h[r, -1][None].to(DEVICE)).item())
        votes[layer] = rows
    return votes


def test_exit_layer_is_the_first_layer_the_gate_votes_exit(model, tmp_path):
    """Alone, each prompt's image tokens leave before the first layer whose gate votes exit on that layer's
    input; no vote: they stay (records unchanged, logits those of the unpatched model)."""
    seen = set()
    for seed in range(12):
        folder = gates(model, tmp_path, seed=seed, name=f"g{seed}")
        method = vlprune.methods.DyVTE(weights=str(folder), threshold=0.5)
        for i, p in enumerate([prompt(), prompt(text_after=(9, 10, 11, 12, 13))]):
            ids, mask = batch([p])
            pv = pixels(1, seed=i)
            votes = expected_votes(model, ids, mask, pv, method)
            first = next((layer for layer in sorted(votes) if votes[layer][0]), None)
            ref = run(model, ids, mask, pv).logits
            with vlprune.pruned(model, "dyvte", weights=str(folder)) as h:
                logits = run(model, ids, mask, pv).logits
            (rec,) = h.last
            seen.add(first)
            if first is None:
                assert rec.after == rec.before and rec.layer is None and torch.equal(logits, ref)
            else:
                assert rec.layer == first and rec.after == 0
                with vlprune.pruned(model, "visual_exit", layer=first):
                    assert torch.equal(logits, run(model, ids, mask, pv).logits)
    assert len(seen) >= 2, seen  # the random gates exercised more than one outcome


def test_a_batch_exits_where_every_row_votes_exit(model, tmp_path):
    ids, mask = batch([prompt(), prompt(text_before=(1, 7), text_after=(9, 10, 11, 12, 13, 14))])
    pv = pixels(2, seed=3)
    outcomes = set()
    for seed in range(12):
        folder = gates(model, tmp_path, seed=seed, name=f"b{seed}")
        method = vlprune.methods.DyVTE(weights=str(folder))
        votes = expected_votes(model, ids, mask, pv, method)
        first = next((layer for layer in sorted(votes) if all(votes[layer])), None)
        with vlprune.pruned(model, "dyvte", weights=str(folder)) as h:
            run(model, ids, mask, pv)
        assert [r.layer for r in h.last] == [first, first]
        outcomes.add(first)
    assert len(outcomes) >= 2, outcomes


def test_threshold_zero_is_a_fixed_exit_and_layer_is_the_earliest(model, tmp_path):
    folder = gates(model, tmp_path)
    ids, mask = batch([prompt()])
    pv = pixels(1)
    for layer in (1, 2, 3):
        with vlprune.pruned(model, "dyvte", weights=str(folder), threshold=0.0, layer=layer) as h:
            got = run(model, ids, mask, pv).logits
        assert h.last[0].layer == layer
        with vlprune.pruned(model, "visual_exit", layer=layer):
            assert torch.equal(got, run(model, ids, mask, pv).logits)


@pytest.mark.parametrize("options,needle", [
    ({"threshold": 1.0}, "threshold must be a number in [0, 1)"),
    ({"threshold": -0.1}, "threshold must be a number in [0, 1)"),
    ({"threshold": True}, "threshold must be"),
    ({"threshold": "hi"}, "threshold must be"),
    ({"weights": 3}, "weights must be a path"),
    ({"layer": "2"}, "layer must be"),
    ({"layer": 4}, "layer=4 is out of range"),
    ({"ratio": 0.5}, "ratio"),
])
def test_bad_options_are_clear_errors_at_patch(model, tmp_path, options, needle):
    folder = gates(model, tmp_path)
    with pytest.raises(VlpruneError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        vlprune.patch(model, "dyvte", **{"weights": str(folder), **options})
    assert not hasattr(model, "_vlprune")


def test_weights_are_checked_before_any_call(model, tmp_path):
    with pytest.raises(VlpruneError, match="must be a folder with config.json and model.safetensors"):
        vlprune.patch(model, "dyvte", weights=str(tmp_path / "nothing"))
    other = build_llava(lm_layers=2)
    folder = gates(other, tmp_path, name="other")
    with pytest.raises(VlpruneError, match=r"were trained for .* differs from this model .* text_layers 2 \(model: 4\)"):
        vlprune.patch(model, "dyvte", weights=str(folder))
    assert not hasattr(model, "_vlprune")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "method": "atp"}))
    with pytest.raises(VlpruneError, match="trained for method='atp', not method='dyvte'"):
        vlprune.patch(other, "dyvte", weights=str(folder))
    (folder / "config.json").write_text("{")
    with pytest.raises(VlpruneError, match="not valid JSON"):
        vlprune.patch(other, "dyvte", weights=str(folder))


def test_tiny_contract_options_come_from_the_shared_helper(model):
    opts = learned_options(model, "dyvte")
    base = learned.load(opts["weights"], "dyvte")[0]["base"]
    assert opts["threshold"] == 0.0 and all(base[k] == learned.signature(model)[k] for k in learned.SIGNATURE)


# -- the shipped gates and training, on the embedded model -------------------------------------------
def _embedded():
    from vlprune.embedded import asset_dir

    try:
        asset_dir()
        learned.shipped("dyvte")
    except (FileNotFoundError, VlpruneError):
        pytest.skip("no embedded checkpoint or shipped dyvte gates in this copy")
    return vlprune.load_embedded()


def test_shipped_gates_are_the_default_on_the_embedded_model_and_vary_per_prompt():
    from vlprune.embedded import scenes

    model, processor = _embedded()
    items = scenes.test_items(60)
    layers = []
    with vlprune.pruned(model, "dyvte") as h:
        for it in items[:60:3]:
            inputs = processor(images=[it["image"]], text=[scenes.prompt(it["question"])], return_tensors="pt")
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=4, do_sample=False)
            layers.append(h.last[0].layer)
    assert h.method.loaded()[1]["base"]["name"].startswith("embedded")
    assert len(set(layers)) >= 2, layers  # adaptive: not one fixed layer for every prompt


def test_training_writes_loadable_weights_and_resumes(tmp_path):
    from vlprune.train import main

    _embedded()
    out = tmp_path / "run"
    args = ["dyvte", "--out", str(out), "--examples", "12", "--chunk", "6", "--epochs", "2", "--batch", "4"]
    assert main(args) == 0
    log = (out / "train.log").read_text()
    assert "labels: chunk 2/2" in log and "gates: epoch 2/2" in log and "ETA" in log
    config, tensors = learned.load(out, "dyvte")
    assert config["trained"]["prompts"] == 12 and set(config["trained"]["layers"]) == {"1", "2", "3"}
    assert sorted(tensors) == [f"gates.{i}.{w}" for i in (1, 2, 3) for w in ("w1", "w2")]
    model, _ = vlprune.load_embedded()
    vlprune.patch(model, "dyvte", weights=str(out)).remove()
    # a second run on the same folder labels nothing again and continues from the last epoch
    assert main(args[:-4] + ["--epochs", "3", "--batch", "4"]) == 0
    log = (out / "train.log").read_text()
    assert log.count("labels: chunk") == 1 and "gates: resumed after epoch 2" in log and "gates: epoch 3/3" in log


def test_train_cli_names_the_trainable_methods(capsys):
    from vlprune.train import main

    assert main(["atpp", "--out", "x"]) == 2
    assert "METHOD must be one of atp, dyvte, tokenflex; got 'atpp'" in capsys.readouterr().err


# -- training on any Hugging Face VLM from a JSONL of prompts (the recipe for real checkpoints) -----------------
def test_training_a_hugging_face_checkpoint_from_jsonl(tmp_path):
    import eval_tiny

    from vlprune.train import main

    ckpt = eval_tiny.save_checkpoint(tmp_path / "ckpt")
    eval_tiny.write_prompts(tmp_path)
    out = tmp_path / "gates"
    args = ["dyvte", "--model", str(ckpt), "--data", str(tmp_path / "data.jsonl"), "--out", str(out),
            "--examples", "6", "--chunk", "3", "--epochs", "2", "--batch", "4"]
    assert main(args) == 0
    config, tensors = learned.load(out, "dyvte")
    assert config["trained"]["prompts"] == 6 and sorted(tensors) == ["gates.1.w1", "gates.1.w2"]  # 2 LM layers
    assert all(v == v for v in config["trained"]["layers"]["1"].values())  # no NaN: a held-out prompt exists
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(ckpt)
    vlprune.patch(model, "dyvte", weights=str(out)).remove()


@pytest.mark.parametrize("extra,needle", [
    (["--model", "x"], "--model other than the embedded one needs --data FILE.jsonl"),
    (["--data", "missing.jsonl"], "--data 'missing.jsonl' is not a file"),
])
def test_bad_training_data_is_a_clear_error_before_the_model_loads(tmp_path, monkeypatch, extra, needle):
    from vlprune.train import dyvte, main

    monkeypatch.setattr(dyvte, "load_base", lambda args: pytest.fail("the model loaded before the data was checked"))
    with pytest.raises(VlpruneError, match=needle):
        main(["dyvte", "--out", str(tmp_path / "o"), *extra])


def test_a_malformed_jsonl_row_names_its_line(tmp_path):
    from vlprune.train.dyvte import read_jsonl

    (tmp_path / "d.jsonl").write_text('{"image": "nope.png", "question": "q", "answer": "a"}\n')
    with pytest.raises(VlpruneError, match=r"line 1: needs a JSON object with an openable 'image'"):
        read_jsonl(tmp_path / "d.jsonl", 5)
