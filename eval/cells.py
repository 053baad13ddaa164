"""The grid of a ``vlprune-eval`` sweep and the cells it caches on disk.

A cell is one run: the unpruned baseline, or one method at one budget with its options. Its key names the
folder ``OUTPUT/runs/<key>`` and holds the exact budget (the ratio as Python writes it back exactly, or the
keep count) and the options given, so two different runs never share a folder. A folder is reused only
when the record inside says it is this very cell: folders of older versions, named by a rounded ratio,
are recomputed rather than reused for another budget.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Callable

from vlprune.errors import VlpruneError

DEFAULT_POSITIONS = "contiguous"


@dataclass(frozen=True)
class Cell:
    """``method=None`` is the unpruned baseline; budgeted methods carry a ratio or a keep; ``options`` are
    the method options given on top of the method's defaults, as sorted (name, value) pairs."""

    method: str | None = None
    ratio: float | None = None
    keep: int | None = None
    options: tuple[tuple[str, Any], ...] = ()
    positions: str = DEFAULT_POSITIONS

    @property
    def budget(self) -> str:
        if self.method is None:
            return "unpruned"
        if self.ratio is not None:
            return f"ratio {self.ratio!r}"  # repr: exact, so 0.4980468 and 0.4980469 stay apart
        return f"keep {self.keep}" if self.keep is not None else "own"

    @property
    def settings(self) -> str:
        """The options and a non-default ``positions``, as ``name=value`` words ("" when none)."""
        words = [f"{k}={v}" for k, v in self.options]
        if self.positions != DEFAULT_POSITIONS:
            words.append(f"positions={self.positions}")
        return " ".join(words)

    @property
    def key(self) -> str:
        if self.method is None:
            return "unpruned"
        key = "-".join([self.method, self.budget.replace(" ", ""), *self.settings.split()])
        safe = re.sub(r"[^A-Za-z0-9_.=+-]", "_", key)
        # a folder name cannot hold every option value: a replaced character gets a digest of the exact key
        return key if safe == key else f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"

    def to_dict(self) -> dict:
        """As stored in cell.json (JSON types), and compared with what a cached record holds."""
        return {"method": self.method, "ratio": self.ratio, "keep": self.keep, "options": dict(self.options),
                "positions": self.positions}

    def patch_kwargs(self) -> dict:
        """``vlprune.patch`` keywords (empty for the baseline)."""
        if self.method is None:
            return {}
        kw = {"method": self.method, **dict(self.options)}
        kw.update({k: v for k, v in (("ratio", self.ratio), ("keep", self.keep)) if v is not None})
        if self.positions != DEFAULT_POSITIONS:
            kw["positions"] = self.positions
        return kw


def check_options(method_options: dict, methods: list[str], flag: str = "--method-options") -> dict[str, dict]:
    """``{method: {option: value}}`` validated by each method's own ``Method.create`` (unknown options, types,
    ranges), and each method among ``methods``: a mistake stops the run before the model loads."""
    from vlprune.registry import get_method

    checked = {}
    for name, options in method_options.items():
        cls = get_method(name)  # an unknown name: the registry's error with the nearest names
        if name not in methods:
            raise VlpruneError(f"{flag} sets options of method {name!r}, which this sweep does not run; "
                               f"its methods: {', '.join(methods) or '(none)'}")
        try:
            cls.create(**options)
        except VlpruneError as exc:
            raise VlpruneError(f"{flag} {name}:{','.join(f'{k}={v}' for k, v in options.items())}: {exc}") from None
        checked[name] = dict(options)
    return checked


def _unique(values: list, flag: str, notes: list[str]) -> list:
    seen = list(dict.fromkeys(values))
    if len(seen) < len(values):
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        notes.append(f"{flag} lists {', '.join(twice)} more than once; each runs once")
    return seen


def grid(methods: list[str], ratios: list[float] = (), keeps: list[int] = (), options: dict | None = None,
         positions: str = DEFAULT_POSITIONS, note: Callable[[str], Any] | None = None) -> list[Cell]:
    """The unpruned baseline, then every method at every budget. Ratio 0 is the baseline itself, so it is
    not repeated per method; a method that decides its own budget runs once; a method, ratio or keep given
    twice runs once, and ``note`` is told so (once per flag)."""
    from vlprune.api import POSITIONS
    from vlprune.budget import Budget
    from vlprune.registry import get_method

    if ratios and keeps:
        raise VlpruneError("give --ratios or --keep, not both (ratio = fraction of visual tokens removed, "
                           "keep = visual tokens kept per image)")
    if positions not in POSITIONS:
        raise VlpruneError(f"--positions must be one of {', '.join(POSITIONS)}; got {positions!r}")
    notes: list[str] = []
    methods = _unique(list(methods), "--methods", notes)
    ratios = _unique([r for r in ratios if r != 0], "--ratios", notes)
    keeps = _unique(list(keeps), "--keep", notes)
    for n in notes:
        (note or (lambda _m: None))(n)
    options = check_options(options or {}, methods)
    budgets = [Budget(ratio=r) for r in ratios] + [Budget(keep=k) for k in keeps]
    cells = [Cell()]
    for name in methods:
        cls = get_method(name)  # unknown name -> error with the nearest registered name
        opts = tuple(sorted(options.get(name, {}).items()))
        if not cls.budgeted:
            cells.append(Cell(name, options=opts, positions=positions))
            continue
        cells += [Cell(name, b.ratio, b.keep, opts, positions) for b in budgets]
    return cells


# -- cached cells ---------------------------------------------------------------------------------------
def _numbers_by_task(value) -> bool:
    return isinstance(value, dict) and all(
        isinstance(m, dict) and all(isinstance(v, Real) and not isinstance(v, bool) for v in m.values())
        for m in value.values())


def read_record(path: Path) -> tuple[dict | None, str | None]:
    """(record, problem) from a ``cell.json``: problem says why a file that is there cannot be used
    (not JSON, not an object, a finished cell without its metrics); both None when there is no file."""
    if not path.is_file():
        return None, None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        return None, f"is not valid JSON ({exc})"
    if not isinstance(record, dict):
        return None, f"holds a JSON {type(record).__name__}, not a cell record"
    if record.get("status") == "ok" and not _numbers_by_task(record.get("metrics")):
        return None, "is marked finished but has no valid 'metrics' ({task: {metric: number}})"
    return record, None


def reuse_problem(record: dict, cell: Cell, fingerprint: dict, need_samples: bool) -> str | None:
    """Why a well-formed cached record is not a finished result of ``cell`` under this configuration."""
    if record.get("status") != "ok":
        return "failed last time; retrying"
    if record.get("cell") != cell.to_dict():
        return f"holds another run ({record.get('cell')!r}); recomputing"
    if record.get("config") != fingerprint:
        return "was computed with another configuration (model, weights, tasks, limit or bootstrap); recomputing"
    if need_samples and not record.get("samples"):
        return "has no per-sample answers (it ran without --log-samples); recomputing"
    return None
