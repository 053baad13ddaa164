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
from vlprune.eval import sweep  # noqa: E402

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
        sweep.check_model("nobody/llava-missing", allow_download=False)
    with pytest.raises(VlpruneError, match="no such checkpoint folder"):
        sweep.check_model(str(tmp_path / "nothing-here"), allow_download=False)
    out = run([str(BIN / "vlprune-eval"), "--tasks", "pope", "--methods", "pool", "--ratios", "0.5",
               "--output", str(tmp_path / "o")], tmp_path)
    assert out.returncode == 2
    assert "task 'pope' cannot load its data" in out.stderr and "lmms-lab-encoder/POPE" in out.stderr, out.stderr[-2000:]
    out = run([str(BIN / "vlprune-eval"), "--tasks", "popee", "--output", str(tmp_path / "o")], tmp_path)
    assert out.returncode == 2 and "unknown task(s): 'popee' (did you mean pope" in out.stderr, out.stderr[-2000:]


def test_recipes_resolve_to_valid_grids():
    names = sorted(p.stem for p in sweep.recipe_dir().glob("*.yaml"))
    assert "llava15-paper" in names
    for name in names:
        args = sweep.parser().parse_args(["--recipe", name])
        config, cells, out, recipe = sweep.resolve(args)
        assert config.model == "llava-hf/llava-1.5-7b-hf" and config.base == "llava_hf"
        assert len(cells) > 1 and cells[0].key == "unpruned"
        assert (sweep.recipe_dir() / recipe["reported"]).is_file()
    config, cells, _, _ = sweep.resolve(sweep.parser().parse_args(["--recipe", "llava15-paper", "--tasks", "pope"]))
    assert config.tasks == ["pope"] and {c.keep for c in cells[1:]} == {192, 128, 64}
    with pytest.raises(VlpruneError, match="shipped recipes: .*llava15-paper"):
        sweep.load_recipe("llava-15")


def test_default_is_the_offline_embedded_sweep():
    config, cells, out, _ = sweep.resolve(sweep.parser().parse_args([]))
    assert config.model == "embedded" and config.tasks == ["vlprune_scenes"] and config.limit == 60
    assert config.objects == 60 and len(cells) == 1 + 4 * 2


def test_shipped_task_data_is_the_pinned_split():
    from vlprune.embedded import scenes
    from vlprune.eval.scenes_task import ITEMS

    lines = ITEMS.read_text().splitlines()
    assert len(lines) == scenes.TEST_SIZE
    for line, it in zip(lines, scenes.test_items(25)):
        assert json.loads(line) == {k: it[k] for k in ("index", "qtype", "question", "answer")}


@pytest.mark.slow
def test_data_parallel_with_two_cpu_processes(tiny_setup, tmp_path):
    """lmms-eval's data-parallel path (Accelerator + rank sharding + gather), each process patching its own
    model. On GPUs: ``accelerate launch --num_processes N -m lmms_eval ...``; on CPU accelerate needs MPI,
    so the same code runs under torchrun."""
    ckpt, tasks = tiny_setup
    out = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29531", "-m", "lmms_eval",
               "--model", "vlprune", "--model_args",
               f"base=llava_hf,pretrained={ckpt},method=pool,keep=4,device=cpu,device_map=cpu",
               "--tasks", eval_tiny.TASK, "--include_path", str(tasks), "--limit", "4",
               "--output_path", str(tmp_path / "out"), "--log_samples"], tmp_path, timeout=400)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "Running on rank 0" in log and "Running on rank 1" in log
    samples = list((tmp_path / "out").rglob("*_samples_*.jsonl"))
    assert samples and len(samples[0].read_text().splitlines()) == 4  # both shards gathered
