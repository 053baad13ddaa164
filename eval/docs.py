"""The documentation's tables, generated from the registry, and its quoted results, read from their files.

The pages are README.md and ``docs/*.md``. ``python -m vlprune.eval.docs --write`` rewrites every block
between marker comments (``<!-- methods-table -->`` ... ``<!-- /methods-table -->``, one page holds each)
and every ``<!-- include: PATH -->`` quote; ``--check`` exits 1 where a page differs from what the
registry and the committed results say now. ``tests/test_readme.py`` runs the same comparison.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import vlprune
from vlprune import registry

ROOT = Path(__file__).resolve().parent.parent  # the source checkout (editable install)
README = ROOT / "README.md"
BLOCKS = ("methods-list", "methods-table", "released-table", "models-table", "support-table")


def pages(root: Path = ROOT) -> list[Path]:
    """README.md, then the ``docs/`` pages it links to."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _doc_line(obj) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


#: What each paper reports for LLaVA-1.5-7B (average % of the unpruned model's scores), with the
#: source, as collected in the project's reference notes. Benchmark sets differ between papers, so
#: compare across rows with care. [3rd] = a number published by another paper than the method's own.
REPORTED = {
    "fastervlm": "144: 98.75 %, 58: 94.24 %, 29: 89.41 % (10 benchmarks; FasterVLM project page)",
    "vtc_cls": "256: 100.1 %, 128: 98.0 %, 64: 94.6 % (8 benchmarks; computed from the VTC-CLS README figure)",
    "holov": "192: 99.2 %, 128: 98.0 %, 64: 95.8 % (9 benchmarks; HoloV paper, Table 1)",
    "hiprune": "192: 99.3 %, 128: 97.5 %, 64: 92.7 % (9 benchmarks; HiPrune arXiv v2+, Table 2)",
    "flowcut": "192: 100.2 %, 128: 98.5 %, 64: 96.0 % (12 benchmarks; FlowCut paper, Table 1)",
    "visionzip": "192: 98.5 %, 128: 97.2 %, 64: 94.4 % (12 benchmarks; [3rd] FlowCut paper, Table 1)",
    "fastv": "192: 89.4 %, 128: 85.9 %, 64: 77.5 % (12 benchmarks; [3rd] FlowCut paper, Table 1)",
    "prumerge_plus": "256: 97.6 %, 128: 94.4 %, 64: 90.7 % (8 benchmarks; [3rd] computed from the VTC-CLS README figure)",
    "divprune": "LLaVA-NeXT-7B 640: 97.4 %, 320: 95.6 %, 160: 93.4 % (5 benchmarks; [3rd] HiPrune paper)",
    "dyvte": "up to 45.7 % less computation without accuracy loss (DyVTE paper)",
    "atp": "75 % fewer visual tokens on average, 1.9 % average loss on seven benchmarks (ATP-LLaVA paper)",
    "tokenflex": "+1.6 / +1.0 / +0.4 % at 64 / 144 / 256 tokens over models trained at one count (8 benchmarks, its own base VLM; TokenFLEX paper)",
    "visual_exit": "learned exit (DyVTE): up to 45.7 % less computation on LLaVA-1.5 without accuracy loss (arXiv 2411.19628); training-free form: not reported",
}


def signals_of(cls) -> str:
    """The signals a default instance reads, as ``kind@layer``."""
    method = cls.create()
    if cls.stage == "in_encoder":
        kinds = ", ".join(dict.fromkeys(s.kind for s in method.encoder_signals(0)))
        return f"{kinds} after every encoder layer up to the last cut"
    return ", ".join(f"{s.kind}@{s.layer}" for s in method.signals()) or "-"


def methods_list() -> str:
    """One line per registered method, for the README (the full table is on docs/methods.md)."""
    return "\n".join(f"- `{name}` — {summary}" for name, summary in vlprune.methods().items())


def methods_table() -> str:
    lines = ["| method | source | how it chooses | stage | signals | options (default) | reported, LLaVA-1.5-7B |",
             "|---|---|---|---|---|---|---|"]
    for name, summary in vlprune.methods().items():
        cls = registry.get_method(name)
        source = _doc_line(sys.modules[cls.__module__]).split(": ", 1)[0]  # "FasterVLM (arXiv ...)"
        opts = ", ".join(f"`{f.name}={f.default!r}`" for f in dataclasses.fields(cls)) or "-"
        lines.append(f"| `{name}` | {source} | {summary} | {cls.stage} | {signals_of(cls)} | {opts} | "
                     f"{REPORTED.get(name, '-')} |")
    return "\n".join(lines)


def released_table() -> str:
    """Per method: the authors' code it was checked against, how its defaults differ, and the test that checks."""
    tests = README.parent / "tests"
    lines = ["| method | released code read | by default | checked by |", "|---|---|---|---|"]
    for name in vlprune.methods():
        cls = registry.get_method(name)
        test = f"tests/test_released_{name}.py"
        checked = f"`{test}`" if (tests / f"test_released_{name}.py").is_file() else "-"
        lines.append(f"| `{name}` | {cls.released_code} | {cls.released} | {checked} |")
    return "\n".join(lines)


def models_table() -> str:
    lines = ["| model class | patcher | what it covers |", "|---|---|---|"]
    for cname in vlprune.supported_model_classes():
        patcher = registry.patcher_class(cname)
        module = sys.modules[patcher.__module__]
        lines.append(f"| `{cname}` | `{patcher.__module__}.{patcher.__name__}` | {_doc_line(module)} |")
    return "\n".join(lines)


def support(cname: str) -> dict[str, str]:
    """Method -> "yes" | "substitute: ..." | "no: ..." for one model class, derived by its patcher from what
    each method asks (stage, signals, merging) and what the family provides (``Patcher.support``)."""
    patcher = registry.patcher_class(cname)
    return {name: patcher.support(registry.get_method(name)) for name in vlprune.methods()}


def support_table() -> str:
    """Model x method: ✔ as is, ≈ with a documented substitute, ✘ not served (the notes say why)."""
    classes = vlprune.supported_model_classes()
    lines = ["| method | " + " | ".join(f"`{c}`" for c in classes) + " |", "|---|" + "---|" * len(classes)]
    notes: dict[tuple[str, str], list[str]] = {}  # (method, verdict) -> classes; one patcher serving
    for name in vlprune.methods():                 # several classes gives one note, not one per class
        cells = []
        for cname in classes:
            verdict = support(cname)[name]
            if verdict == "yes":
                cells.append("✔")
                continue
            notes.setdefault((name, verdict), []).append(cname)
            number = list(notes).index((name, verdict)) + 1
            cells.append(("≈" if verdict.startswith("substitute") else "✘") + f" ({number})")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    text = [f"{i}. `{name}` on " + ", ".join(f"`{c}`" for c in cnames) + f": {verdict}"
            for i, ((name, verdict), cnames) in enumerate(notes.items(), 1)]
    return "\n".join(lines + ([""] + text if text else []))


def render_tables() -> dict[str, str]:
    """Marker name -> the Markdown table that belongs between that marker pair."""
    return {"methods-list": methods_list(), "methods-table": methods_table(), "released-table": released_table(), "models-table": models_table(),
            "support-table": support_table()}


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- {name} -->\n)(.*?)(\n?<!-- /{name} -->)", re.S)


def read_blocks(text: str) -> dict[str, str]:
    """Marker name -> the text currently between that marker pair (stripped); missing pairs are absent."""
    found = {}
    for name in BLOCKS:
        m = _pattern(name).search(text)
        if m:
            found[name] = m.group(2).strip()
    return found


INCLUDE = re.compile(r"(<!-- include: (\S+) -->\n)(.*?)(\n?<!-- /include: \2 -->)", re.S)


def includes(text: str) -> dict[str, str]:
    """Path -> the text between an ``<!-- include: PATH -->`` marker pair: measured results (a benchmark's or
    a sweep's Markdown table, committed with the raw files beside it) are quoted from their file, never
    retyped, so the README cannot drift from the run that produced them."""
    return {m.group(2): m.group(3).strip() for m in INCLUDE.finditer(text)}


def update(text: str, root: Path = ROOT) -> str:
    """``text`` with each marker block it holds replaced by the generated table and every include by its file."""
    for name, table in render_tables().items():
        text = _pattern(name).sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(3).lstrip("\n"), text, count=1)

    def quote(m):
        path = root / m.group(2)
        if not path.is_file():
            raise ValueError(f"a page includes {m.group(2)}, which does not exist")
        return m.group(1) + path.read_text(encoding="utf-8").strip() + "\n" + m.group(4).lstrip("\n")

    return INCLUDE.sub(quote, text)


def block_homes(root: Path = ROOT) -> dict[str, list[Path]]:
    """Marker name -> the pages that hold it (each block belongs on exactly one page)."""
    homes: dict[str, list[Path]] = {name: [] for name in BLOCKS}
    for page in pages(root):
        for name in read_blocks(page.read_text(encoding="utf-8")):
            homes[name].append(page)
    return homes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlprune.eval.docs", description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT,
                    help=f"the checkout whose README.md and docs/*.md to read or rewrite (default: {ROOT})")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the generated blocks and quotes in the pages")
    mode.add_argument("--check", action="store_true", help="exit 1 if a page's blocks or quotes are out of date")
    args = ap.parse_args(argv)
    if not (args.write or args.check):
        for name, table in render_tables().items():
            print(f"<!-- {name} -->\n{table}\n<!-- /{name} -->\n")
        return 0
    misplaced = {name: where for name, where in block_homes(args.root).items() if len(where) != 1}
    if misplaced:
        ap.error("each generated block must sit on exactly one page: " + "; ".join(
            f"{name} on {[str(p.relative_to(args.root)) for p in where] or 'none'}" for name, where in misplaced.items()))
    stale = []
    for page in pages(args.root):
        text = page.read_text(encoding="utf-8")
        new = update(text, args.root)
        if new == text:
            continue
        stale.append(page)
        if args.write:
            page.write_text(new, encoding="utf-8")
            print(f"updated {page}")
    if args.check and stale:
        print(", ".join(str(p) for p in stale) + ": out of date; run python -m vlprune.eval.docs --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
