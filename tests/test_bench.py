"""Benchmark pieces: the FLOPs counters against hand counts, the references, the memory probe, every geometry
end to end at a tiny scale (towers and LM 64 wide), and the CLI's argument checks."""
import json

import pytest
import torch

import tiny
import vlprune
from test_contract import LMInputs
from tiny import batch, pixels, prompt
from vlprune.eval import bench, geometries
from vlprune.eval.flops import LengthRecorder, llava_prefill_flops


@pytest.fixture(autouse=True)
def one_thread():
    """This file's runs on a shared 2-core machine: one torch thread is far steadier (and faster) than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hand_count(vision_tokens, projector_tokens, lm_tokens):
    """tests/tiny.py's LLaVA written out: vision 12 x (64 wide, MLP 128); LM 4 x (64 wide, kv 32, MLP 128)."""
    n, L = vision_tokens, lm_tokens
    vision = 12 * 2 * (4 * n * 64 * 64 + 2 * n * n * 64 + 2 * n * 64 * 128)
    projector = 2 * (projector_tokens * 64 * 64 + projector_tokens * 64 * 64)
    llm = 4 * 2 * (2 * L * 64 * 64 + 2 * L * 64 * 32 + 2 * 64 * L * (L + 1) / 2 + 3 * L * 64 * 128)
    head = 2 * 64 * 64
    return vision + projector + llm + head


def counted(model, **patch):
    ids, mask = batch([prompt()])
    rec = LengthRecorder(model.model.vision_tower.encoder.layers, model.model.language_model.layers,
                         model.model.multi_modal_projector)
    try:
        with torch.inference_mode():
            if patch:
                with vlprune.pruned(model, **patch):
                    model(input_ids=ids, attention_mask=mask, pixel_values=pixels(1), logits_to_keep=1)
            else:
                model(input_ids=ids, attention_mask=mask, pixel_values=pixels(1), logits_to_keep=1)
    finally:
        rec.close()
    return llava_prefill_flops(model.config, rec)["total"]


def test_flops_counter_matches_a_hand_count(llava):
    L = len(prompt())
    assert counted(llava) == pytest.approx(hand_count(17, 16, L), rel=1e-12)
    assert counted(llava, method="fastervlm", keep=4) == pytest.approx(hand_count(17, 4, L - 12), rel=1e-12)


def test_references_agree_with_the_patched_model(llava):
    ids, mask = batch([prompt()])
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(1)}
    rec = LMInputs(llava)
    try:
        with torch.inference_mode():
            bench.ideal_call(llava, inputs, 4)()
            eager_logits = bench.eager_reference_call(llava, inputs, 4)().logits
            with vlprune.pruned(llava, "fastervlm", keep=4):
                patched_logits = llava(**inputs, logits_to_keep=1).logits
    finally:
        rec.close()
    assert [c["embeds"].shape[1] for c in rec.calls] == [len(prompt()) - 12] * 3
    # the eager reference reads the same [CLS] row the patch computes from q/k: the same tokens survive
    torch.testing.assert_close(eager_logits, patched_logits, rtol=1e-4, atol=1e-5)
    assert llava.model.vision_tower.config._attn_implementation == "sdpa"


def test_peak_memory_sees_a_temporary_allocation():
    with bench.PeakMemory("cpu") as mem:
        x = torch.ones(16 * 2**20 // 4)  # 16 MiB, freed before the block ends
        del x
    assert 15 <= mem.peak_mb < 64


@pytest.mark.slow
def test_quick_benchmark_writes_its_outputs(tmp_path):
    assert bench.main(["--quick", "--lm-width", "256", "--output", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert {r["method"] for r in rows} >= {"unpruned", "ideal", "eager-reference", "fastervlm"}
    assert (tmp_path / "bench.png").stat().st_size > 0 and "| method |" in (tmp_path / "bench.md").read_text()
    ideal = next(r for r in rows if r["method"] == "ideal")
    assert ideal["prefill_n"] == len(ideal["prefill_samples_ms"]) == 2  # --quick: once before the methods, once after
    assert ideal["prefill_ms"] == pytest.approx(sum(ideal["prefill_samples_ms"]) / 2)
    fastv = next(r for r in rows if r["method"] == "fastv")  # more FLOPs than its ideal: a prediction to compare to
    assert fastv["vs_flops_predicted"] == pytest.approx(fastv["prefill_ms"] / fastv["flops_predicted_ms"])
    fastervlm = next(r for r in rows if r["method"] == "fastervlm")
    assert "vs_flops_predicted" not in fastervlm  # the ideal's FLOPs
    # × ideal is against the ideal calls timed alternately with the row's own
    assert len(fastervlm["paired_ideal_ms"]) == fastervlm["prefill_n"]
    assert fastervlm["vs_ideal"] == pytest.approx(fastervlm["prefill_ms"] / fastervlm["paired_ideal_ms"][0])


def test_flops_prediction_is_the_line_through_ideal_and_unpruned():
    unpruned = {"method": "unpruned", "tflops": 3.0, "prefill_ms": 300.0}
    ideal = {"method": "ideal", "tflops": 1.0, "prefill_ms": 100.0}
    assert bench.flops_predicted_ms({"method": "fastv", "tflops": 2.0}, ideal, unpruned) == pytest.approx(200.0)
    assert bench.flops_predicted_ms({"method": "flowcut", "tflops": 0.9}, ideal, unpruned) == pytest.approx(90.0)
    assert bench.flops_predicted_ms({"method": "pool", "tflops": 1.0}, ideal, unpruned) is None
    assert bench.flops_predicted_ms({"method": "x", "tflops": 2.0}, ideal, {**unpruned, "tflops": 1.0}) is None


# -- geometries: the FLOPs counters of the other families, written out by hand ------------------------
def _recorded(geo, model, call):
    rec = geo.recorder(model)
    try:
        with torch.inference_mode():
            call()
    finally:
        rec.close()
    return geo.flops(model, rec)["total"]


def _geometry(name):
    return bench.GEOMETRIES[name].__new__(bench.GEOMETRIES[name])  # the family's hooks, no CLI arguments


def next_hand_count(lm_tokens, projected):
    """tests/test_llava_next_hf.py's tiny NeXT written out: 5 views (base + 2x2 crops of a 112 px image) x 12
    CLIP layers x 17 tokens (64 wide, MLP 128); projector 64 -> 64 -> 64 over ``projected`` tokens; LM 4 x
    (64 wide, kv 32, MLP 128); head 64 x vocab 64 for one position."""
    vision = 5 * 12 * 2 * (4 * 17 * 64 * 64 + 2 * 17 * 17 * 64 + 2 * 17 * 64 * 128)
    projector = 2 * projected * (64 * 64 + 64 * 64)
    L = lm_tokens
    llm = 4 * 2 * (2 * L * 64 * 64 + 2 * L * 64 * 32 + 2 * 64 * L * (L + 1) / 2 + 3 * L * 64 * 128)
    return vision + projector + llm + 2 * 64 * 64


def test_llava_next_flops_match_a_hand_count():
    from test_llava_next_hf import next_config
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration._from_config(next_config(), attn_implementation="sdpa").eval()
    inputs = geometries.llava_next_inputs(model, 1, "cpu", torch.float32, (112, 112))
    L = inputs["input_ids"].shape[1]
    assert L == 1 + 20 + (16 + 64 + 8) + 30  # text, base 4x4 + unpadded 8x8 high-res + 8 newlines, text
    geo = _geometry("llava-next")
    assert _recorded(geo, model, lambda: model(**inputs, logits_to_keep=1)) == pytest.approx(
        next_hand_count(L, 5 * 16), rel=1e-12)
    with vlprune.pruned(model, "fastervlm", keep=20) as h:
        total = _recorded(geo, model, lambda: model(**inputs, logits_to_keep=1))
    newlines = h.last[0].newlines
    assert h.last[0].after == 20 and 1 <= newlines <= 8
    assert total == pytest.approx(next_hand_count(L - 88 + 20 + newlines, 20), rel=1e-12)


def qwen_hand_count(lm_tokens):
    """tests/test_qwen2_5_vl.py's tiny Qwen2.5-VL written out for a 112 px image: 8 x 8 = 64 patches; vision 4
    blocks 32 wide (gated MLP 64): blocks 0 and 2 attend within 4 windows of 16 patches, 1 and 3 over all 64;
    merger on 16 merged tokens (128 -> 128 -> 64); LM 4 x (64 wide, kv 32, MLP 128); head 64 x vocab 64."""
    linear = 4 * 64 * 32 * 32 + 3 * 64 * 32 * 64
    windowed = linear + 2 * 32 * (4 * 16 * 16)
    full = linear + 2 * 32 * 64 * 64
    vision = 2 * (2 * windowed + 2 * full)
    merger = 2 * (16 * 128 * 128 + 16 * 128 * 64)
    L = lm_tokens
    llm = 4 * 2 * (2 * L * 64 * 64 + 2 * L * 64 * 32 + 2 * 64 * L * (L + 1) / 2 + 3 * L * 64 * 128)
    return vision + merger + llm + 2 * 64 * 64


def test_qwen2_5_vl_flops_match_a_hand_count():
    from test_qwen2_5_vl import build_qwen

    model = build_qwen()
    inputs = geometries.qwen2_5_vl_inputs(model, 1, model.device, torch.float32, (112, 112))
    L = inputs["input_ids"].shape[1]
    assert L == 1 + 20 + 1 + 16 + 1 + 30
    geo = _geometry("qwen2_5_vl")
    assert _recorded(geo, model, lambda: model(**inputs, logits_to_keep=1)) == pytest.approx(qwen_hand_count(L),
                                                                                              rel=1e-12)
    with vlprune.pruned(model, "pool", keep=4):
        total = _recorded(geo, model, lambda: model(**inputs, logits_to_keep=1))
    assert total == pytest.approx(qwen_hand_count(L - 12), rel=1e-12)
    with vlprune.pruned(model, "flowcut", keep=4):  # fewer units in later blocks, in shrunken windows
        assert _recorded(geo, model, lambda: model(**inputs, logits_to_keep=1)) < qwen_hand_count(L - 12)


def test_dinov2_tower_flops_match_a_hand_count():
    """The embedded family (LLaVA with a DINOv2 tower): 6 layers x 17 tokens (64 wide, MLP 128)."""
    model = tiny.dinov2_llava(lm_layers=2)
    ids = torch.tensor([[1, 7] + [5] * 16 + [8, 9]])
    call = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56), logits_to_keep=1)
    L = ids.shape[1]
    vision_f = 6 * 2 * (4 * 17 * 64 * 64 + 2 * 17 * 17 * 64 + 2 * 17 * 64 * 128)
    want = vision_f + 2 * 16 * (64 * 64 + 64 * 64) + 2 * 2 * (
        4 * L * 64 * 64 + 2 * 64 * L * (L + 1) / 2 + 3 * L * 64 * 128) + 2 * 64 * 32
    assert _recorded(_geometry("embedded"), model, lambda: model(**call)) == pytest.approx(want, rel=1e-12)


# -- geometries: the references of the other families --------------------------------------------------
def _sharpened_next():
    from test_llava_next_hf import next_config
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration._from_config(next_config(), attn_implementation="sdpa").eval()
    with torch.no_grad():  # sharpen the random attention so no per-view top-q boundary is a near-tie
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


def test_llava_next_references():
    """ideal at k = N is the unpruned model; the eager reference picks fastervlm's tokens (same LM input)."""
    model = _sharpened_next()
    inputs = geometries.llava_next_inputs(model, 2, "cpu", torch.float32, (112, 112))
    with torch.inference_mode():
        full = model(**inputs, logits_to_keep=1).logits
        torch.testing.assert_close(geometries.next_ideal_call(model, inputs, 80)().logits, full, rtol=1e-5, atol=1e-6)
        eager = geometries.next_eager_reference_call(model, inputs, 20)().logits
        with vlprune.pruned(model, "fastervlm", keep=20):
            patched = model(**inputs, logits_to_keep=1).logits
        ideal = geometries.next_ideal_call(model, inputs, 20)
        seen = []
        hook = model.model.language_model.register_forward_pre_hook(
            lambda _m, _a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
        try:
            ideal()
        finally:
            hook.remove()
    torch.testing.assert_close(eager, patched, rtol=1e-4, atol=1e-5)
    assert seen == [1 + 20 + 16 + 4 + 1 + 30]  # the base view's 16, then 4 of high-res row 0 and its newline
    assert model.model.vision_tower.config._attn_implementation == "sdpa"


def test_qwen2_5_vl_ideal_keeps_original_positions():
    from test_qwen2_5_vl import LMInputs, build_qwen

    model = build_qwen()
    inputs = geometries.qwen2_5_vl_inputs(model, 2, model.device, torch.float32, (112, 112))
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs["image_grid_thw"])
    rec = LMInputs(model)
    try:
        with torch.inference_mode():
            full = model(**inputs, logits_to_keep=1).logits
            torch.testing.assert_close(geometries.qwen_ideal_call(model, inputs, 16)().logits, full,
                                       rtol=1e-5, atol=1e-6)
            ideal = geometries.qwen_ideal_call(model, inputs, 4)
            ideal()
            out = ideal(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        rec.close()
    first = 1 + 20 + 1  # text, then <vision_start>: the image's first merged token
    keep = list(range(first + 4)) + list(range(first + 16, inputs["input_ids"].shape[1]))
    assert torch.equal(rec.calls[2]["position_ids"], pos[:, :, keep])  # the first 4 at their 3-D positions
    assert out.shape == (2, len(keep) + 3)  # generate ran on the short prompt (ids in, ids + new out)
    step = rec.calls[4]["position_ids"]  # the first decode step continues after the full prompt's maximum
    assert int(step[-3:].max()) == int(pos.max()) + 1


# -- geometries: end to end at a tiny scale (towers 64 wide, LM 64 wide x 3 layers) ----------------------
TINY = ["--tiny-vision", "--lm-width", "64", "--lm-layers", "3", "--repeats", "1", "--new-tokens", "2"]




# (geometry, extra flags, keep, visual tokens, image-block tokens unpruned / ideal, methods, eager reference)
GEOMETRY_RUNS = [
    ("llava15", [], 64, 576, (576, 64), "fastervlm,fastv", True),
    # a square image on the 1 x 2 pinpoint: unpadding leaves the middle 24 of 48 high-res columns
    # (ideal's 160 lie in the base view: no newline)
    ("llava-next", ["--image-size", "336x336"], 160, 1152, (1152 + 24, 160), "fastervlm", True),
    # <vision_start> and <vision_end> around the merged tokens
    ("qwen2_5_vl", ["--image-size", "448x448"], 64, 256, (2 + 256, 2 + 64), "fastervlm,flowcut", False),
]
FULL_SIZE_RUNS = [  # the default 672 x 672 images: 2,880 tokens + 48 newlines; 576 merged tokens
    ("llava-next", [], 160, 2880, (2880 + 48, 160), "fastervlm", True),
    ("qwen2_5_vl", [], 64, 576, (2 + 576, 2 + 64), "fastervlm,flowcut", False),
]


@pytest.mark.parametrize("geometry, flags, keep, n, block, methods, eager",
                         GEOMETRY_RUNS + [pytest.param(*r, marks=pytest.mark.slow) for r in FULL_SIZE_RUNS])
def test_each_geometry_runs_end_to_end(tmp_path, geometry, flags, keep, n, block, methods, eager):
    assert bench.main(["--geometry", geometry, "--methods", methods, "--keeps", str(keep), "--output", str(tmp_path),
                       *TINY, *flags]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "bench.json").read_text())}
    assert set(rows) == {"unpruned", "ideal", *methods.split(",")} | ({"eager-reference"} if eager else set())
    lm_full = 1 + 20 + block[0] + 30
    assert rows["unpruned"]["lm_tokens"] == lm_full and rows["unpruned"]["keep"] == n
    assert rows["ideal"]["lm_tokens"] == 1 + 20 + block[1] + 30
    for m in methods.split(","):
        assert rows[m]["kept"] == keep == rows[m]["keep"]
        assert rows[m]["tflops"] < rows["unpruned"]["tflops"]
    if "fastv" in rows:
        assert rows["fastv"]["lm_tokens"] == lm_full and rows["fastv"]["lm_tokens_last_layer"] == lm_full - n + keep
    md = (tmp_path / "bench.md").read_text()
    header = md.split("\n")[0]
    size = flags[1] if flags else "336x336" if geometry == "llava15" else "672x672"
    for fact in (f"**{geometry}**", size, f"{n:,} ",
                 "64 wide, 3 layers", "float32", "`sdpa`", bench.machine("cpu")):
        assert fact in header
    assert (tmp_path / "bench.png").stat().st_size > 0 and (tmp_path / "bench.csv").read_text().count("\n") == len(rows) + 1
    assert ("no eager-reference rows" in md) == (not eager)


def test_embedded_geometry_runs_end_to_end_or_says_why(tmp_path, capsys):
    why = geometries.embedded_unavailable()
    code = bench.main(["--geometry", "embedded", "--methods", "fastervlm", "--keeps", "28", "--repeats", "1",
                       "--new-tokens", "2", "--output", str(tmp_path)])
    assert code == 0
    if why:
        assert "skipped --geometry embedded" in capsys.readouterr().err and not (tmp_path / "bench.json").exists()
        return
    rows = {r["method"]: r for r in json.loads((tmp_path / "bench.json").read_text())}
    assert set(rows) == {"unpruned", "ideal", "eager-reference", "fastervlm"}
    assert rows["fastervlm"]["kept"] == 28 and rows["unpruned"]["keep"] == 256
    assert rows["ideal"]["lm_tokens"] == rows["unpruned"]["lm_tokens"] - 256 + 28
    assert "DINOv2-small" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--geometry", "llava"], "invalid choice: 'llava'"),
    (["--image-size", "672x672"], "--image-size applies to --geometry llava-next or qwen2_5_vl"),
    (["--geometry", "qwen2_5_vl", "--image-size", "500x500"], "multiples of 28"),
    (["--geometry", "llava-next", "--image-size", "big"], "HEIGHTxWIDTH"),
    (["--geometry", "embedded", "--lm-width", "512"], "do not apply to --geometry embedded"),
    (["--geometry", "llava-next", "--keeps", "2880"], "--keeps must lie in 1..2879"),
    (["--keeps", "64,half"], "comma list of integers"),
    (["--lm-width", "100"], "multiple of 64"),
])
def test_bad_arguments_name_the_parameter(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse(argv)
    assert message in capsys.readouterr().err


def test_default_budgets_per_geometry():
    keeps = {g: bench.parse(["--geometry", g]).keeps for g in bench.GEOMETRIES}
    assert keeps == {"llava15": [192, 128, 64], "llava-next": [640, 320, 160], "qwen2_5_vl": [192, 128, 64],
                     "embedded": [85, 57, 28]}
    assert bench.parse(["--geometry", "qwen2_5_vl", "--image-size", "448x448"]).keeps == [85, 57, 28]
    assert bench.parse(["--geometry", "llava-next", "--quick"]).keeps == [160]


def test_support_table_loads_the_patchers_itself():
    """The benchmark asks a family's support table before any model is patched: a fresh interpreter must find
    the patchers (entry points) on its own (this once failed with a KeyError on every default run)."""
    import subprocess
    import sys

    code = ("from vlprune.eval.docs import support; from vlprune.registry import patcher_class\n"
            "print(support('LlavaForConditionalGeneration')['fastervlm'])\n"
            "try:\n    patcher_class('NoSuchModel')\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "yes"
    assert "VlpruneError no patcher for model class 'NoSuchModel'" in out and "LlavaForConditionalGeneration" in out


def test_targets_script_judges_rows_against_the_issue_targets(tmp_path):
    """scripts/bench_targets.py: PASS at or under a target, NOISE over it but within the ideal's range, FAIL
    otherwise (exit 1); fastv against its FLOPs prediction, damro's generate against the unpruned one."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "scripts" / "bench_targets.py"
    spec = importlib.util.spec_from_file_location("bench_targets", path)
    targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)
    base = {"keep": 64, "geometry": "llava15", "batch": 8, "dtype": "bfloat16", "device": "cpu"}
    rows = [{**base, "method": "unpruned", "generate_vs_unpruned": 1.0},
            {**base, "method": "ideal", "vs_ideal": 1.0},
            {**base, "method": "fastervlm", "vs_ideal": 1.05, "vs_ideal_noise": False},
            {**base, "method": "pool", "vs_ideal": 1.08, "vs_ideal_noise": True},
            {**base, "method": "flowcut", "vs_ideal": 1.02, "vs_ideal_noise": False},
            {**base, "method": "fastv", "vs_ideal": 1.5, "vs_flops_predicted": 1.04},
            {**base, "method": "damro", "generate_vs_unpruned": 1.4},
            {**base, "method": "visual_exit"}]
    got = {line.split()[1]: verdict for verdict, line in targets.verdicts(rows)}
    assert got == {"fastervlm": "PASS", "pool": "NOISE", "flowcut": "FAIL", "fastv": "PASS", "damro": "FAIL"}
    (tmp_path / "bench.json").write_text(json.dumps(rows))
    assert targets.main([str(tmp_path / "bench.json")]) == 1
    (tmp_path / "ok.json").write_text(json.dumps(rows[:4]))
    assert targets.main([str(tmp_path / "ok.json")]) == 0
