"""The README's promises: tables generated from the registry, the two-command quick start that CI runs,
and the example it advertises."""
import argparse
import inspect
import os
import re
import shlex
import subprocess
import sys
import tomllib
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


def _page_text() -> str:
    return "\n".join(page.read_text(encoding="utf-8") for page in docs.pages(ROOT))


@pytest.mark.parametrize("name", docs.BLOCKS)
def test_generated_tables_match_the_registry(name):
    assert docs.read_blocks(_page_text()).get(name) == docs.render_tables()[name], (
        f"block {name} is stale or missing: run python -m vlprune.eval.docs --write"
    )


def test_quoted_results_equal_their_committed_files():
    quoted = docs.includes(_page_text())
    assert quoted, "no page quotes a committed results file"
    for path, body in quoted.items():
        assert body == (ROOT / path).read_text(encoding="utf-8").strip(), (
            f"the quoted copy of {path} is stale: run python -m vlprune.eval.docs --write")


def test_tables_list_every_registered_method_and_model():
    tables = docs.render_tables()
    for name, summary in vlprune.methods().items():
        assert re.search(rf"^\| `{name}` \| [^|]* \| {re.escape(summary)} \|", tables["methods-table"], re.M)
        assert f"- `{name}` — {summary}" in tables["methods-list"]
    for cname in vlprune.supported_model_classes():
        assert f"| `{cname}` |" in tables["models-table"]


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


# -- the pages: README.md and docs/*.md ----------------------------------------------------------------
PAGES = docs.pages(ROOT)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def code_blocks(lang: str) -> list[tuple[Path, str]]:
    """(page, body) of every fenced block of ``lang`` ("" = a block of shell commands) in the pages."""
    return [(page, m.group(2)) for page in PAGES
            for m in FENCE.finditer(page.read_text(encoding="utf-8")) if m.group(1) == lang]


def test_generated_blocks_each_sit_on_one_page_and_every_page_is_current():
    homes = docs.block_homes(ROOT)
    assert all(len(where) == 1 for where in homes.values()), homes
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        assert docs.update(text, ROOT) == text, f"{page} is stale: run python -m vlprune.eval.docs --write"


def test_every_relative_link_and_anchor_resolves():
    """Moving sections between pages must not leave a link pointing at nothing."""
    def anchors(page):
        heads = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.M)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}

    checked = 0
    for page in PAGES:
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: link to {target} -> {dest} does not exist"
            if anchor:
                assert anchor in anchors(dest), f"{page.name}: link to {target}: no such heading in {dest.name}"
            checked += 1
    assert checked > 20


def test_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 400
    assert "## Contents" in readme
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"


def test_the_first_snippets_run_offline_as_written(capsys):
    """The README's first Python block (the embedded model, a shipped sample), then the API block that
    continues it, run as written; the hub version right after the first is only compiled (no hub here)."""
    blocks = [body for page, body in code_blocks("python") if page.name == "README.md"]
    offline, hub, api = blocks[:3]
    assert "load_embedded()" in offline and "from_pretrained" not in offline
    assert "llava-hf/llava-1.5-7b-hf" in hub
    compile(hub, "README hub snippet", "exec")
    pytest.importorskip("onnx")
    namespace: dict = {}
    exec(compile(offline, "README first snippet", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "green", printed  # the sample's answer, as the snippet's comment says
    assert printed[1].startswith("[ImageRecord(row=0, before=256, after=32, kept=[")
    exec(compile(api, "README API snippet", "exec"), namespace)
    assert not hasattr(namespace["model"], "_vlprune")  # it ends unpatched, as it says


def test_every_python_block_compiles():
    for page, body in code_blocks("python"):
        compile(body, str(page), "exec")


# -- every command the pages show ------------------------------------------------------------------------
def shell_commands() -> list[tuple[Path, str]]:
    """(page, command) for each command line of the pages' shell blocks: continuation lines joined,
    trailing comments dropped; in a transcript (lines starting ``$ ``) only those lines are commands."""
    out = []
    for page, body in code_blocks(""):
        lines = body.replace("\\\n", " ").splitlines()
        if any(line.startswith("$ ") for line in lines):
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        for line in lines:
            line = re.split(r"\s+# ", line, maxsplit=1)[0].strip()
            if line:
                out.append((page, line))
    return out


class _Parsed(Exception):
    pass


def _parse_only(main, argv, monkeypatch):
    """Run ``main(argv)`` until its argparse parser has accepted ``argv``, then stop (before any model
    loads): an unknown flag or a bad value for a typed flag fails here as it would for a user."""
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse)
        with pytest.raises(_Parsed):
            main(argv)


def _check_pip(argv):
    """Extras that pyproject.toml defines; ``--no-deps`` pins that .ci/run installs the same way."""
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"])
    assert argv[0] == "install", argv
    ci = " ".join(ci_commands())
    for arg in argv[1:]:
        if arg.startswith("."):
            asked = set(re.fullmatch(r"\.(?:\[([\w,]+)\])?", arg).group(1).split(",")) if "[" in arg else set()
            assert asked <= extras, f"pip install {arg}: no such extra {asked - extras}; pyproject has {sorted(extras)}"
        elif "==" in arg:
            assert "--no-deps" in argv and arg in ci, f"pin {arg} is not what .ci/run installs with --no-deps"
        else:
            assert arg in ("-e", "--no-deps"), f"pip install: unchecked argument {arg}"


def _check_lmms_eval(argv, monkeypatch):
    """lmms-eval's own parser, then the plugin's split of model_args and the method's validation."""
    from lmms_eval.__main__ import parse_eval_args
    from lmms_eval.utils import simple_parse_args_string

    from vlprune.budget import Budget
    from vlprune.eval import plugin
    from vlprune.registry import get_method

    assert argv[0] == "eval", argv
    monkeypatch.setattr(sys, "argv", ["lmms-eval", *argv[1:]])
    _, args = parse_eval_args()
    assert args.model == "vlprune"
    base, patch, rest = plugin.split_args(simple_parse_args_string(args.model_args))
    assert base in plugin.available_bases(), base
    named = inspect.signature(plugin.base_class(base, simple=True).__init__).parameters
    assert set(rest) <= set(named) - {"self", "args", "kwargs"}, f"model_args {sorted(rest)}: not all named by {base}"
    options = {k: v for k, v in patch.items() if k not in ("method", "ratio", "keep", "positions")}
    get_method(patch["method"]).create(**options)
    Budget(ratio=patch.get("ratio"), keep=patch.get("keep"))
    if args.include_path:
        assert Path(args.include_path).is_dir(), args.include_path


def _substitute(command: str) -> str:
    """``$(python -c '...')`` replaced by what it prints, run with this interpreter."""
    def run(m):
        inner = shlex.split(m.group(1))
        assert inner[:2] == ["python", "-c"], inner
        return subprocess.run([sys.executable, "-c", inner[2]], capture_output=True, text=True, check=True).stdout.strip()

    return re.sub(r"\$\((.*?)\)(?=\")", run, command)  # a quoted substitution


def _check(command: str, monkeypatch) -> str:
    """Check one command; returns how (for the test's report)."""
    from vlprune.embedded import evaluate as emb_evaluate
    from vlprune.eval import bench, cli, demo

    clis = {"vlprune-eval": cli.main, "vlprune-bench": bench.main, "vlprune-demo": demo.main,
            "vlprune-example": example.main, "vlprune.embedded.evaluate": emb_evaluate.main}
    hows = []
    for step in (s.strip() for s in command.split("&&")):
        argv = shlex.split(_substitute(step))
        while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # environment assignments
            argv = argv[1:]
        program = argv[0].removeprefix(".venv/bin/")
        if program in ("python", "python3") and argv[1:3] == ["-m", "venv"]:
            hows.append("venv")
        elif program == "pip":
            _check_pip(argv[1:])
            hows.append("pip: extras and pins checked")
        elif program in ("python", "python3") and argv[1:3] == ["-m", "pytest"]:
            markers = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["pytest"]["ini_options"]["markers"]
            if "-m" in argv[3:]:
                assert any(m.startswith(argv[argv.index("-m", 3) + 1] + ":") for m in markers), argv
            hows.append("pytest: run by .ci/run" if argv[3:] == [] else "pytest: marker checked")
        elif program in ("python", "python3") and argv[1:3] == ["-m", "vlprune.eval.docs"]:
            assert argv[3:] in (["--write"], ["--check"]), argv
            hows.append("docs: run by test_generated_blocks_each_sit_on_one_page_and_every_page_is_current")
        elif program in clis or (program in ("python", "python3") and argv[1:3] == ["-m", "vlprune.embedded.evaluate"]):
            name = program if program in clis else argv[2]
            rest = argv[1:] if program in clis else argv[3:]
            _parse_only(clis[name], rest, monkeypatch)
            hows.append(f"{name}: parsed")
        elif program == "lmms-eval":
            _check_lmms_eval(argv[1:], monkeypatch)
            hows.append("lmms-eval: parsed, model_args validated")
        else:
            raise AssertionError(f"no check for the command {step!r}: add one to tests/test_readme.py")
    return "; ".join(hows)


def test_every_command_on_the_pages_is_checked(monkeypatch):
    """Each command of README.md and docs/ goes through the real parser of the tool it names (a renamed
    or removed flag fails), pip lines through pyproject's extras and .ci/run's pins, lmms-eval's
    model_args through the plugin's split and the method's own validation."""
    commands = shell_commands()
    assert len(commands) >= 20
    report = [f"{page.name}: {command} -> {_check(command, monkeypatch)}" for page, command in commands]
    assert all("->" in line for line in report)


def offline_commands() -> list[str]:
    """The README's evaluation commands that need no hub and no GPU: the quick start's main job and the
    offline lines of the Evaluation section."""
    main_job = quick_start_lines()[0].split("&&")[-1].strip().removeprefix(".venv/bin/")
    lines = [c for page, c in shell_commands() if page.name == "README.md"
             and c.split()[0] in ("vlprune-eval", "lmms-eval") and not re.search(r"--model \S+/|cuda|--recipe", c)]
    return [main_job, *lines]


@pytest.mark.parametrize("command", offline_commands())
def test_the_readmes_offline_commands_run_as_written(command, tmp_path):
    """Each runs in a fresh folder with this venv's tools first on PATH, as a user's shell would."""
    pytest.importorskip("onnx")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    if command.startswith("vlprune-eval"):
        out = re.search(r"--output (\S+)", command)
        table = (tmp_path / (out.group(1) if out else "vlprune-eval-results") / "results.md").read_text()
        assert "| unpruned |" in table and re.search(r"\| (fastervlm|hiprune) \|", table), table
    else:
        assert re.search(r"vlprune_scenes\s*\|.*accuracy", done.stdout + done.stderr), done.stdout[-3000:]
