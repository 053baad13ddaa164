"""The lmms-eval model ``vlprune``: registration, argument routing, and real runs on a tiny checkpoint."""
from __future__ import annotations

import inspect

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

    from loguru import logger

    logged = []
    sink = logger.add(lambda m: logged.append(str(m)), level="INFO", filter="vlprune")
    try:
        lm = plugin.build(f"base=llava_hf,pretrained={ckpt},method=fastervlm,keep=4,layer=-3,device=cpu")
    finally:
        logger.remove(sink)
    # the base itself, not a wrapper: a subclass that only carries the patch's name (lmms-eval's backend name)
    assert type(lm).__mro__[1] is LlavaHf and not [k for k, v in vars(type(lm)).items() if inspect.isfunction(v)]
    assert type(lm).__name__ == "LlavaHf+vlprune(fastervlm keep=4 layer=-3)"
    patch_lines = [m for m in logged if "vlprune:" in m]
    assert len(patch_lines) == 1 and "pruned by fastervlm keep=4 layer=-3 (every option: layer=-3; " \
        "positions=contiguous)" in patch_lines[0], logged
    handle = lm.vlprune_handle
    assert handle.active and handle.config.options["layer"] == -3
    model = plugin.hf_model(lm)
    out = simple_evaluate(model=lm, tasks=[eval_tiny.TASK], limit=2, task_manager=task_manager,
                          bootstrap_iters=0, log_samples=True, verbosity="WARNING")
    assert "accuracy,none" in out["results"][eval_tiny.TASK]
    assert [r.after for r in handle.last] == [4] and handle.last[0].before == 16
    assert out["config"]["model_backend"] == ("lmms_eval.models.chat.llava_hf.LlavaHf+vlprune(fastervlm keep=4 "
                                              "layer=-3) (chat)")
    samples = out["samples"][eval_tiny.TASK]
    assert len(samples) == 2 and all(plugin.kept_of_sample(x) == [4] for x in samples)
    assert all(x["token_counts"][0]["output_tokens"] >= 1 for x in samples)  # the base's own counts kept
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


def test_kept_counts_follow_each_request_through_reordering_batches_and_failures():
    """A base that answers in its own order, two prompts per generate, with one generate that fails (so the
    handle's records do not change): each answer gets its own images' counts, a failed one none."""
    from types import SimpleNamespace

    from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts

    docs = [{"kept": 10 + i, "fail": i in (2, 3)} for i in range(6)]

    class Base:
        def __init__(self):
            self.task_dict = {"t": {"test": docs}}
            self.vlprune_handle = SimpleNamespace(last=[])

        def generate_until(self, requests):
            order, out = sorted(range(len(requests)), key=lambda i: -i), {}
            for start in range(0, len(order), 2):
                chunk = order[start:start + 2]
                read = [self.task_dict["t"]["test"][requests[i].args[3]] for i in chunk]
                if not read[0]["fail"] and self.vlprune_handle:
                    self.vlprune_handle.last = [SimpleNamespace(row=r, after=d["kept"]) for r, d in enumerate(read)]
                out.update({i: GenerationResult(f"a{i}", TokenCounts(output_tokens=i)) if i == 5 else f"a{i}"
                            for i in chunk})
            return [out[i] for i in range(len(requests))]

    lm = Base()
    plugin._count_kept(lm)
    requests = [Instance("generate_until", ("q", {}, None, i, "t", "test"), idx=0,
                         metadata={"task": "t", "doc_id": i, "repeats": 1}) for i in range(6)]
    answers = lm.generate_until(requests)
    assert lm.task_dict == {"t": {"test": docs}}  # put back
    kept = [a.token_counts.visual_tokens_kept if isinstance(a, GenerationResult) else None for a in answers]
    assert kept == [[10], [11], None, None, [14], [15]]
    assert answers[5].token_counts.to_dict() == {"output_tokens": 5, "visual_tokens_kept": [15]}
    assert answers[2] == "a2"  # a failed batch: the answer untouched
    lm.vlprune_handle = None  # unpruned: nothing added
    assert lm.generate_until(requests[:1]) == ["a0"]


def test_embedded_base_batches_carry_kept_counts():
    """The embedded base answers 4 prompts per generate: every answer gets its own count."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vlprune.eval.scenes_task import task_dir

    lm = plugin.build("base=embedded,method=pool,keep=16,device=cpu,device_map=cpu", {"batch_size": 4})
    assert type(lm).__name__ == "EmbeddedLlava+vlprune(pool keep=16)"
    out = simple_evaluate(model=lm, tasks=["vlprune_scenes"], limit=6, bootstrap_iters=0, log_samples=True,
                          task_manager=TaskManager("WARNING", include_path=[task_dir()], include_defaults=False),
                          verbosity="WARNING")
    samples = out["samples"]["vlprune_scenes"]
    assert [plugin.kept_of_sample(x) for x in samples] == [[16]] * 6
