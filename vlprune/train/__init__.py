"""``vlprune-train METHOD`` (or ``python -m vlprune.train METHOD``): train a learned method's weights.

Each trainable method has a module here with ``add_arguments(parser)`` and ``run(args)``; it writes a
folder that ``vlprune.patch(model, METHOD, weights=FOLDER)`` loads (see ``vlprune.learned``). By default
they train for the embedded model on its synthetic scenes, on the CPU.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

#: trainable method -> its training module
TRAINERS = {"atp": "vlprune.train.atp", "dyvte": "vlprune.train.dyvte", "tokenflex": "vlprune.train.tokenflex"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + f"\n\ntrainable methods: {', '.join(sorted(TRAINERS))}")
        return 0 if argv else 2
    name = argv[0]
    if name not in TRAINERS:
        print(f"vlprune-train: error: METHOD must be one of {', '.join(sorted(TRAINERS))}; got {name!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(TRAINERS[name])
    ap = argparse.ArgumentParser(prog=f"vlprune-train {name}", description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the weights folder (an existing one resumes)")
    ap.add_argument("--threads", type=int, default=2)
    module.add_arguments(ap)
    args = ap.parse_args(argv[1:])
    import torch

    torch.set_num_threads(args.threads)
    module.run(args)
    return 0


class Log:
    """Progress lines, timestamped, to stdout and appended to a training folder's ``train.log``."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, msg: str):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def eta(done: int, total: int, t0: float) -> str:
    """Minutes left when ``done`` of ``total`` units took the time since ``t0``."""
    if done == 0:
        return "?"
    left = (time.time() - t0) / done * (total - done)
    return f"{left / 60:.1f} min"
