"""The lmms-eval model ``vlprune``: registration, argument routing, and real runs on a tiny checkpoint."""
from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval")

import eval_tiny  # noqa: E402
from vlprune import VlpruneError  # noqa: E402
from vlprune.eval import plugin  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return eval_tiny.save_checkpoint(tmp_path_factory.mktemp("tiny-llava-ckpt"))


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    from lmms_eval.tasks import TaskManager

    folder = eval_tiny.write_task(tmp_path_factory.mktemp("tasks") / "tiny")
    return TaskManager("WARNING", include_path=[str(folder)], include_defaults=False)


def test_registered_through_the_entry_point():
    from lmms_eval.models import get_model, list_available_models

    assert "vlprune" in list_available_models()
    assert get_model("vlprune") is plugin.VlpruneLM and not plugin.VlpruneLM.is_simple
    assert get_model("vlprune", force_simple=True) is plugin.VlpruneSimpleLM


def test_unknown_base_lists_the_bases():
    with pytest.raises(VlpruneError, match=r"unknown base='llava_hff'.*llava_hf.*qwen2_5_vl.*embedded"):
        plugin.build("base=llava_hff,pretrained=x,method=pool,keep=4")


def test_arguments_are_routed():
    base, patch, rest = plugin.split_args({"base": "llava_hf", "pretrained": "p", "method": "fastervlm",
                                           "ratio": 0.75, "layer": -3, "device_map": "cpu"})
    assert base == "llava_hf" and rest == {"pretrained": "p", "device_map": "cpu"}
    assert patch == {"method": "fastervlm", "ratio": 0.75, "layer": -3}
    with pytest.raises(VlpruneError, match="without method="):
        plugin.split_args({"ratio": 0.5})
    with pytest.raises(VlpruneError, match="Did you mean 'fastervlm'"):
        plugin.build("base=llava_hf,pretrained=x,method=fastvlm,ratio=0.5")
    with pytest.raises(VlpruneError, match="ratio must be in"):
        plugin.build("base=llava_hf,pretrained=x,method=pool,ratio=1.5")


def test_patched_base_runs_a_local_task(ckpt, task_manager):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models.chat.llava_hf import LlavaHf

    lm = plugin.build(f"base=llava_hf,pretrained={ckpt},method=fastervlm,keep=4,layer=-2,device=cpu")
    assert type(lm) is LlavaHf  # the base itself, not a wrapper: its request handling is untouched
    handle = lm.vlprune_handle
    assert handle.active and handle.config.options["layer"] == -2
    model = plugin.hf_model(lm)
    out = simple_evaluate(model=lm, tasks=[eval_tiny.TASK], limit=2, task_manager=task_manager,
                          bootstrap_iters=0, log_samples=False, verbosity="WARNING")
    assert "accuracy,none" in out["results"][eval_tiny.TASK]
    assert [r.after for r in handle.last] == [4] and handle.last[0].before == 16
    handle.remove()
    assert "_vlprune" not in model.__dict__


def test_model_name_resolves_through_simple_evaluate(ckpt, task_manager):
    """The same path the ``lmms-eval`` CLI takes: ``--model vlprune --model_args ...``."""
    from lmms_eval.evaluator import simple_evaluate

    out = simple_evaluate(model="vlprune", model_args=f"base=llava_hf,pretrained={ckpt},method=pool,ratio=0.75",
                          tasks=[eval_tiny.TASK], limit=1, device="cpu", task_manager=task_manager,
                          bootstrap_iters=0, log_samples=False, verbosity="WARNING")
    assert out["results"][eval_tiny.TASK]["accuracy,none"] in (0.0, 1.0)
    assert "method=pool" in str(out["config"]["model_args"])
