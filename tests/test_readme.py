"""The README's promises: tables generated from the registry, the two-command quick start that CI runs,
and the example it advertises."""
import os
import re
import shlex
from pathlib import Path

import pytest

import vlprune
from vlprune.eval import docs, example

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI = ROOT / ".ci" / "run"


def quick_start_lines() -> list[str]:
    section = README.split("## Quick start", 1)[1]
    block = re.search(r"```[^\n]*\n(.*?)```", section, re.S)
    assert block, "the Quick start section has no code block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def ci_commands() -> list[str]:
    """The commands of .ci/run, one per line, without comments and without a trailing `|| ...`."""
    out = []
    for line in CI.read_text(encoding="utf-8").splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line.split("||", 1)[0].strip())
    return out


@pytest.mark.parametrize("name", docs.BLOCKS)
def test_readme_tables_match_the_registry(name):
    assert docs.read_blocks(README).get(name) == docs.render_tables()[name], (
        f"README block {name} is stale: run python -m vlprune.eval.docs --write"
    )


def test_quoted_results_equal_their_committed_files():
    quoted = docs.includes(README)
    assert quoted, "README quotes no committed results file"
    for path, body in quoted.items():
        assert body == (ROOT / path).read_text(encoding="utf-8").strip(), (
            f"README's copy of {path} is stale: run python -m vlprune.eval.docs --write")


def test_tables_list_every_registered_method_and_model():
    tables = docs.render_tables()
    for name, summary in vlprune.methods().items():
        assert re.search(rf"^\| `{name}` \| [^|]* \| {re.escape(summary)} \|", tables["methods-table"], re.M)
    for cname in vlprune.supported_model_classes():
        assert f"| `{cname}` |" in tables["models-table"]
    assert docs.update(README) == README


def test_quick_start_is_two_commands_and_ci_runs_the_test_command():
    lines = quick_start_lines()
    assert len(lines) == 2, lines
    run_example, run_tests = lines
    assert run_example.endswith(".venv/bin/vlprune-eval")  # the main job: the offline sweep on the embedded model
    steps = [s.strip() for s in run_tests.split("&&")]
    assert steps[-1].endswith("pytest"), steps
    venv, *installs, test = steps
    assert installs and all(".venv/bin/pip install" in step for step in installs), installs
    commands = ci_commands()
    assert test in commands, f"{CI} does not run the README's test command {test!r}"
    for install in installs:
        assert install in commands, f"{CI} does not install as the README does ({install!r})"
    assert [commands.index(i) for i in installs] == sorted(commands.index(i) for i in installs)
    assert any(shlex.split(c)[:3] == shlex.split(venv)[:3] for c in commands), f"{CI} creates no venv like {venv!r}"
    assert commands.index(installs[-1]) < commands.index(test)
    assert os.access(CI, os.X_OK), f"{CI} is not executable"


def test_example_prints_token_counts_and_passes_its_checks(capsys):
    rc = example.main(["--ratios", "0,0.75", "--repeats", "1", "--methods", "fastervlm,pool"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "RANDOM WEIGHTS" in out
    for method in ("fastervlm", "pool"):
        assert re.search(rf"^{method}\s+0\s+576->576\s+588\s.*logits bit-identical$", out, re.M), out
        assert re.search(rf"^{method}\s+0\.75\s+576->144\s+156\s", out, re.M), out
        assert re.search(rf"^  {method}\s+visual 576->144 .*starts with prompt: yes$", out, re.M), out
    assert "All checks passed" in out


@pytest.mark.parametrize("argv, needle", [
    (["--methods", "fastvlm"], "unknown method(s) fastvlm"),
    (["--ratios", "0,1.0"], "got ratio=1.0"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_example_rejects_bad_arguments_before_building_anything(capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        example.main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
