"""Benchmark pieces: the FLOPs counter against a hand count, the references, the memory probe."""
import json

import pytest
import torch

import vlprune
from test_contract import LMInputs
from tiny import IMAGE_TOKEN, batch, pixels, prompt
from vlprune.eval import bench
from vlprune.eval.flops import LengthRecorder, llava_prefill_flops


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
