"""The command lines: ``lmms-eval`` sees and runs ``--model vlprune`` offline, ``vlprune-eval`` explains
what is missing, recipes and the shipped task data are consistent; data parallel with two CPU processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

import eval_tiny  # noqa: E402
from vlprune import VlpruneError  # noqa: E402
from vlprune.eval import cli  # noqa: E402

BIN = Path(sys.executable).parent
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return eval_tiny.save_checkpoint(root / "ckpt"), eval_tiny.write_task(root / "tasks" / "tiny", n=4)


def run(args, cwd, timeout=300):
    return subprocess.run(args, cwd=cwd, env=OFFLINE, capture_output=True, text=True, timeout=timeout)


def test_lmms_eval_lists_vlprune(tmp_path):
    out = run([str(BIN / "lmms-eval"), "models"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert any(line.split()[:1] == ["vlprune"] for line in out.stdout.splitlines()), out.stdout[-2000:]


def test_lmms_eval_runs_the_plugin_offline(tiny_setup, tmp_path):
    ckpt, tasks = tiny_setup
    out = run([str(BIN / "lmms-eval"), "eval", "--model", "vlprune", "--model_args",
               f"base=llava_hf,pretrained={ckpt},method=hiprune,ratio=0.75,object_layer=1,device_map=cpu",
               "--tasks", eval_tiny.TASK, "--include_path", str(tasks), "--limit", "2", "--device", "cpu",
               "--output_path", str(tmp_path / "out")], tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    results = list((tmp_path / "out").rglob("*_results.json"))
    assert results, (out.stdout + out.stderr)[-3000:]
    data = json.loads(results[0].read_text())
    assert "accuracy,none" in data["results"][eval_tiny.TASK]
    assert "method=hiprune" in str(data["config"]["model_args"])


def test_vlprune_eval_names_what_to_download(tmp_path):
    with pytest.raises(VlpruneError, match=r"hf download nobody/llava-missing.*HF_HOME"):
        cli.check_model("nobody/llava-missing", allow_download=False)
    with pytest.raises(VlpruneError, match="no such checkpoint folder"):
        cli.check_model(str(tmp_path / "nothing-here"), allow_download=False)
    out = run([str(BIN / "vlprune-eval"), "--tasks", "pope", "--methods", "pool", "--ratios", "0.5",
               "--output", str(tmp_path / "o")], tmp_path)
    assert out.returncode == 2
    assert "task 'pope' cannot load its data" in out.stderr and "lmms-lab-encoder/POPE" in out.stderr, out.stderr[-2000:]
    out = run([str(BIN / "vlprune-eval"), "--tasks", "popee", "--output", str(tmp_path / "o")], tmp_path)
    assert out.returncode == 2 and "unknown task(s): 'popee' (did you mean pope" in out.stderr, out.stderr[-2000:]


def test_recipes_resolve_to_valid_grids():
    names = sorted(p.stem for p in cli.recipe_dir().glob("*.yaml"))
    assert "llava15-paper" in names
    for name in names:
        args = cli.parser().parse_args(["--recipe", name])
        config, cells, out, recipe = cli.resolve(args)
        assert config.model == "llava-hf/llava-1.5-7b-hf" and config.base == "llava_hf"
        assert len(cells) > 1 and cells[0].key == "unpruned"
        assert (cli.recipe_dir() / recipe["reported"]).is_file()
    config, cells, _, _ = cli.resolve(cli.parser().parse_args(["--recipe", "llava15-paper", "--tasks", "pope"]))
    assert config.tasks == ["pope"] and {c.keep for c in cells[1:]} == {192, 128, 64}
    with pytest.raises(VlpruneError, match="shipped recipes: .*llava15-paper"):
        cli.load_recipe("llava-15")


def test_default_is_the_offline_embedded_sweep():
    config, cells, out, _ = cli.resolve(cli.parser().parse_args([]))
    assert config.model == "embedded" and config.tasks == ["vlprune_scenes"] and config.limit == 60
    assert config.objects == 60 and len(cells) == 1 + 4 * 2


def test_shipped_task_data_is_the_pinned_split(tmp_path):
    from vlprune.embedded import scenes
    from vlprune.eval.scenes_task import ITEMS, write_items

    lines = ITEMS.read_text().splitlines()
    assert len(lines) == scenes.TEST_SIZE
    write_items(tmp_path / "items.jsonl", n=25)  # what the pinned split writes today
    assert lines[:25] == (tmp_path / "items.jsonl").read_text().splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("base", ["llava_hf", "embedded"])
def test_data_parallel_with_two_cpu_processes(tiny_setup, tmp_path, base):
    """lmms-eval's data-parallel path (Accelerator + rank sharding + gather), each process patching its own
    model. On GPUs: ``accelerate launch --num_processes N -m lmms_eval ...``; on CPU accelerate needs MPI,
    so the same code runs under torchrun, with the README's ``device=cpu,device_map=cpu`` for either base."""
    from vlprune.eval.scenes_task import task_dir

    ckpt, tasks = tiny_setup
    model = f"base=llava_hf,pretrained={ckpt}" if base == "llava_hf" else "base=embedded"
    task, include = (eval_tiny.TASK, tasks) if base == "llava_hf" else ("vlprune_scenes", task_dir())
    out = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29531", "-m", "lmms_eval",
               "--model", "vlprune", "--model_args", f"{model},method=pool,keep=4,device=cpu,device_map=cpu",
               "--tasks", task, "--include_path", str(include), "--limit", "4",
               "--output_path", str(tmp_path / "out"), "--log_samples"], tmp_path, timeout=400)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "Running on rank 0" in log and "Running on rank 1" in log
    samples = list((tmp_path / "out").rglob("*_samples_*.jsonl"))
    assert samples and len(samples[0].read_text().splitlines()) == 4  # both shards gathered
    from vlprune.eval.plugin import kept_of_sample

    assert [kept_of_sample(json.loads(x)) for x in samples[0].read_text().splitlines()] == [[4]] * 4
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())
    assert "+vlprune(pool keep=4)" in results["config"]["model_backend"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if anything tries to load the model or index the tasks."""
    from vlprune.eval.sweep import Sweep

    def refuse(*_a, **_k):
        raise AssertionError("got as far as loading the model")

    monkeypatch.setattr(Sweep, "lm", refuse)
    monkeypatch.setattr(Sweep, "task_manager", refuse)


@pytest.mark.parametrize("flags, message", [
    (["--limit", "-1"], "--limit must be a whole number of items >= 1 or a fraction in (0, 1)"),
    (["--limit", "0"], "--limit must be"),
    (["--limit", "2.5"], "--limit must be"),
    (["--batch-size", "0"], "--batch-size must be an int >= 1; got 0"),
    (["--bootstrap-iters", "-5"], "--bootstrap-iters must be an int >= 0"),
    (["--objects", "-1"], "--objects must be an int >= 0"),
    (["--threads", "0"], "--threads must be an int >= 1"),
    (["--method-options", "fastervlm"], "--method-options takes METHOD:OPTION=VALUE"),
    (["--method-options", "fastervlm:layer"], "--method-options takes METHOD:OPTION=VALUE"),
    (["--method-options", "fastervlm:lyr=1"], "unknown option(s) lyr for method='fastervlm'; allowed: layer"),
    (["--method-options", "fastervlm:layer=top"], "layer must be an int for method='fastervlm'; got layer='top'"),
    (["--method-options", "hiprun:alpha=0.1"], "Did you mean 'hiprune'"),
    (["--method-options", "visionzip:dominant=8"], "which this sweep does not run"),
    (["--positions", "first"], "--positions must be one of contiguous, original"),
    (["--model-args", "method=pool"], "--model-args must not set method (use --methods)"),
    (["--model-args", "dtype"], "--model-args takes key=value pairs"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--ratios", "0.75", "--keep", "64"], "give --ratios or --keep, not both"),
    (["--keep", "0"], "keep must be >= 1"),
])
def test_bad_flags_stop_before_the_model_loads(tmp_path, capsys, no_model_load, flags, message):
    assert cli.main([*flags, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_cuda_device_missing_is_said_before_the_model_loads(tmp_path, capsys, no_model_load):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["--device", "cuda", "--output", str(tmp_path / "out")]) == 2
    assert "this machine has 0 CUDA device(s)" in capsys.readouterr().err


def test_unusable_output_is_rejected_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["--output", str(blocker / "results")]) == 2
    err = capsys.readouterr().err
    assert f"--output '{blocker / 'results'}' is not usable" in err and "Traceback" not in err, err

    def read_only(*_a, **_k):  # what a read-only folder answers to a user who is not root
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(cli.tempfile, "mkstemp", read_only)
    assert cli.main(["--output", str(tmp_path / "ro")]) == 2
    assert "is not usable: Permission denied" in capsys.readouterr().err


def test_method_options_and_positions_on_the_command_line(tmp_path):
    notes = []
    args = cli.parser().parse_args(["--methods", "fastervlm,pool", "--keep", "64,64", "--positions", "original",
                                    "--method-options", "fastervlm:layer=-3", "--log-samples",
                                    "--bootstrap-iters", "0"])
    config, cells, _, _ = cli.resolve(args, notes.append)
    assert [c.key for c in cells] == ["unpruned", "fastervlm-keep64-layer=-3-positions=original",
                                      "pool-keep64-positions=original"]
    assert cells[1].patch_kwargs() == {"method": "fastervlm", "keep": 64, "layer": -3, "positions": "original"}
    assert notes == ["--keep lists 64 more than once; each runs once"]
    assert config.log_samples and config.bootstrap_iters == 0
    assert cli.parse_method_options(["damro:outliers=5,alpha=1.5,prune=none", "damro:scoring=head"]) == \
        {"damro": {"outliers": 5, "alpha": 1.5, "prune": None, "scoring": "head"}}
    # a recipe's method_options and the flag merge, the flag winning
    recipe = tmp_path / "r.yaml"
    recipe.write_text("methods: [hiprune]\nkeep: [64]\nmethod_options: {hiprune: {alpha: 0.2, object_layer: 3}}\n")
    args = cli.parser().parse_args(["--recipe", str(recipe), "--method-options", "hiprune:alpha=0.3"])
    assert cli.resolve(args)[1][1].options == (("alpha", 0.3), ("object_layer", 3))


def test_readme_cpu_data_parallel_model_args_work_for_the_embedded_base():
    """``...,device=cpu,device_map=cpu`` (the README's CPU data-parallel line) with base=embedded: device_map
    naming the one device is accepted; one it cannot honour is a clear error."""
    from vlprune.eval import plugin
    from vlprune.eval.embedded_lmms import one_device

    lm = plugin.build("base=embedded,method=pool,keep=16,device=cpu,device_map=cpu")
    assert str(lm._device) == "cpu" and lm.vlprune_handle.budget.keep == 16
    assert str(one_device(None, "cpu")) == "cpu" and str(one_device("cuda:1", "cuda")) == "cuda:1"
    with pytest.raises(ValueError, match="runs on one device, so device_map may only name it .*'auto'"):
        one_device("cpu", "auto")
    with pytest.raises(ValueError, match="name different devices"):
        one_device("cpu", "cuda")
