"""Judge ``vlprune-bench`` results against issue #15's speed targets, from the JSON the benchmark wrote.

    python scripts/bench_targets.py OUT/bench.json [more bench.json ...]

Targets (per budget, each row against the ideal of the same run, i.e. the same machine):
- every ``encoder``/``projector``-stage method: prefill <= 1.05 x ideal;
- ``flowcut`` (it saves vision work the ideal does not): prefill <= 1.00 x ideal;
- ``fastv``: prefill <= 1.05 x what its FLOPs predict (bench's "x FLOPs-predicted");
- ``damro``: ``generate`` <= 1.3 x the unpruned ``generate`` at the same new tokens.

A row above its target whose timed range overlaps its ideal's is reported as NOISE, not as a failure:
this run cannot tell it from the ideal. Exit status 1 if any row FAILs.
"""
from __future__ import annotations

import json
import sys

from vlprune.registry import get_method

RULES = {  # method or stage -> (the row's key, limit, what it is measured against)
    "flowcut": ("vs_ideal", 1.00, "ideal"),
    "fastv": ("vs_flops_predicted", 1.05, "FLOPs-predicted"),
    "damro": ("generate_vs_unpruned", 1.3, "unpruned generate"),
    "encoder": ("vs_ideal", 1.05, "ideal"),
    "projector": ("vs_ideal", 1.05, "ideal"),
}
REFERENCES = ("unpruned", "ideal", "eager-reference")


def verdicts(rows: list[dict]) -> list[tuple[str, str]]:
    """(PASS | NOISE | FAIL, line) per row a target applies to."""
    out = []
    for r in rows:
        if r["method"] in REFERENCES:
            continue
        rule = RULES.get(r["method"]) or RULES.get(get_method(r["method"]).stage)
        if rule is None or rule[0] not in r:
            continue
        key, limit, against = rule
        value = r[key]
        verdict = "PASS" if value <= limit else "NOISE" if key == "vs_ideal" and r.get("vs_ideal_noise") else "FAIL"
        out.append((verdict, f"{verdict:5} {r['method']:>14} k={r['keep']:<4} {value:.3f} x {against} (target <= {limit})"))
    return out


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    failed = False
    for path in paths:
        rows = json.loads(open(path).read())
        r0 = rows[0]
        print(f"`{path}`: {r0['geometry']}, batch {r0['batch']}, {r0['dtype']}, on {r0['device']}\n")
        for verdict, line in verdicts(rows):  # a Markdown list, readable as text too
            failed |= verdict == "FAIL"
            print(f"- `{line}`")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
