"""What a pruning method is: options, the signals it needs, and a selection on plain tensors.

A method never sees a model. The patcher resolves its :class:`Signal` requests through hooks, calls
:meth:`Method.select` with the visual tokens of a batch of images, and feeds the result on.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import VlpruneError

#: where a method acts; patchers reject stages they cannot serve.
#: "encoder": on the encoder's output features, before the projector (the projector runs on k tokens);
#: "projector": on the projected features, just before the LM;
#: "in_encoder": progressively between encoder layers (later layers run on fewer tokens);
#: "llm": on the LM's hidden states at a decoder layer (later layers and their KV cache are shorter).
STAGES = ("encoder", "projector", "in_encoder", "llm")
#: a method that does not prune (``prunes = False``) acts at "decoding", inside ``generate``.
DECODING = "decoding"
#: the signal kinds a method may ask for (see :class:`Signal`); a patcher says which it provides.
SIGNAL_KINDS = ("cls_attention", "cls_attention_joint", "attention_received", "keys", "values", "cls_query",
                "cls_key", "cls_value", "last_attention", "image_attention", "text_attention")


@dataclass(frozen=True)
class Signal:
    """A request for one model signal of vision-encoder layer ``layer``.

    ``layer`` is the 0-based index of the encoder layer whose attention is read (negative counts from the
    end; -2 is the layer whose output LLaVA feeds on). N is the number of patch tokens; the [CLS]
    token is never among the N. Kinds, all float32:

    - ``cls_attention`` (B, heads, N): the [CLS] query's softmax attention over the patch keys
      (softmax taken over all keys, [CLS] included; not renormalised).
    - ``cls_attention_joint`` (B, 1, N): the [CLS] row with all heads taken as one head: softmax over all
      keys of the full-width query . keys / sqrt(width) (DAMRO's released ranking).
    - ``attention_received`` (B, heads, N): for each patch key, the attention it receives, averaged
      over every query ([CLS] included); computed in query chunks, never N x N at once.
    - ``keys`` / ``values`` (B, heads, N, head_dim): the patch tokens' keys / values.
    - ``cls_query`` (B, heads, head_dim): the [CLS] token's query.
    - ``cls_key`` / ``cls_value`` (B, heads, head_dim): the [CLS] token's key / value.

    For stage "llm" methods ``layer`` indexes the LM's decoder layers instead, and the kind is:

    - ``last_attention`` (images, heads, N): the prompt's last token's softmax attention (over all
      keys) on each image's N tokens at that decoder layer.
    - ``image_attention`` (images, heads, N): the attention each of an image's tokens receives from that
      image's tokens still in the sequence (mean over those queries; causal, so early tokens receive more).
    - ``text_attention`` (images, heads, N): the same from the prompt's text tokens after the image, up to
      and including its last token.

    Tokens that left at an earlier drop (``Context.alive`` False) read 0 in both.
    """

    kind: str
    layer: int


@dataclass
class Context:
    """Everything a method may use besides the tokens themselves."""

    grid: tuple[int, int]  # (rows, cols) of the patch grid, raster order
    signals: dict[Signal, torch.Tensor] = field(default_factory=dict)
    alive: torch.Tensor | None = None  # stage "llm" plans: (images, N) which tokens are still in the sequence


@dataclass
class Selection:
    """Result of a method for a batch of B images.

    ``indices`` (B, k): which tokens survive (for merging methods: the token each output stands for).
    ``scores`` (B, N) or None: the per-token importance, for inspection and plots.
    ``tokens`` (B, k, D) or None: replacement features (merging methods); None means "gather indices".
    ``sources`` (B, k, N) or None: for merging methods, the weight of each input token in each output
    token (row i says which tokens output i merged); recorded in ``handle.last``.
    The core sorts ``indices`` ascending (raster order) and reorders ``tokens``/``sources`` to match.
    """

    indices: torch.Tensor
    scores: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    sources: torch.Tensor | None = None


#: an option's annotation -> (accepted Python types, how the error message names them)
OPTION_TYPES = {"int": ((int,), "an int"), "float": ((int, float), "a number"), "bool": ((bool,), "True or False"),
                "str": ((str,), "a string"), "dict": ((dict,), "a dict"), "None": ((type(None),), "None")}


def check_types(cls, options: dict) -> None:
    """Each option's value against its field's annotation (``int``, ``float | None``, ...): a clear error
    naming the parameter at ``patch()`` time, not a bare TypeError at the first call. bool is not an int."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, value in options.items():
        parts = [p.strip() for p in str(fields[name]).split("|")]
        if any(p not in OPTION_TYPES for p in parts):
            continue  # an annotation this check does not know: the method validates it itself
        ok = any(isinstance(value, OPTION_TYPES[p][0]) and (p == "bool" or not isinstance(value, bool)) for p in parts)
        if not ok:
            allowed = " or ".join(OPTION_TYPES[p][1] for p in parts)
            raise VlpruneError(f"{name} must be {allowed} for method={cls.name!r}; got {name}={value!r}")


@dataclass
class Method:
    """Base class; subclasses are dataclasses whose fields are the method's options."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    released_code: ClassVar[str] = "none"  # the authors' code it was checked against (repo @ commit), or none
    released: ClassVar[str] = ""  # how the default differs from that code, or that it matches (README table)
    stage: ClassVar[str] = "encoder"
    budgeted: ClassVar[bool] = True  # False: the method decides how much to drop (no ratio/keep)
    prunes: ClassVar[bool] = True  # False: a decoding method (damro); it may name a pruning method (``pruner()``)
    merges: ClassVar[bool] = False  # True: its outputs average several tokens (``Selection.tokens``)
    learned: ClassVar[bool] = False  # True: it runs trained weights (``weights=PATH``; see vlprune.learned)

    @classmethod
    def create(cls, **options) -> "Method":
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise VlpruneError(
                f"unknown option(s) {', '.join(unknown)} for method={cls.name!r}; "
                f"allowed: {', '.join(allowed) if allowed else '(none)'}"
            )
        try:
            method = cls(**options)
        except TypeError:  # a range check in __post_init__ met a value of another type: say which
            check_types(cls, options)
            raise
        check_types(cls, options)
        return method

    def options(self) -> dict:
        return dataclasses.asdict(self)

    def signals(self) -> list[Signal]:
        return []

    def select(self, tokens: torch.Tensor, k: int, ctx: Context) -> Selection:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- stage "llm" only -------------------------------------------------------------------------
    def llm_layer(self, depth: int) -> int:  # pragma: no cover - abstract
        """The decoder layer K of an LM ``depth`` layers deep from which the image tokens are cut."""
        raise NotImplementedError

    def llm_plan(self, depth: int) -> list[int] | None:
        """None: one drop, at :meth:`llm_layer`. Otherwise the ascending decoder layers before which
        :meth:`llm_keep` decides, per image, which of its remaining tokens go on (any number)."""
        return None

    def llm_keep(self, layer: int, tokens: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Plans only: (keep (images, N) bool, within ``ctx.alive``; scores (images, N) or None) for the
        tokens (images, N, D) at the input of decoder ``layer`` (zeros where not alive)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def check_base(self, base: dict) -> None:
        """Learned methods: a clear error when their weights were trained for another base model
        (``base`` is :func:`vlprune.learned.signature` of the patched model)."""

    def exit_votes(self, layer: int, text_mean: torch.Tensor, last: torch.Tensor) -> torch.Tensor | None:
        """None: the exit layer does not depend on the LM's state. Otherwise, per row (B,) bool: may the image
        tokens leave before decoder ``layer`` (>= K), given the input of that layer at the prompt's text
        tokens after the image (mean, (B, D); zeros where there are none) and at its last token (B, D)."""
        return None

    def exit_threshold(self) -> float | None:
        """None: cut at K. A share of attention: cut at the first layer >= K where the prompt's last token
        puts less than that share on the image at the layer before (head mean, every row of a batch)."""
        return None

    # -- stage "in_encoder" only ------------------------------------------------------------------
    def encoder_plan(self, feature_layer: int) -> list[int]:  # pragma: no cover - abstract
        """Ascending encoder layers after which the method runs :meth:`encoder_step`; ``feature_layer`` is
        the 0-based layer whose output feeds the projector (the last plan entry must be ``< feature_layer``)."""
        raise NotImplementedError

    def encoder_signals(self, layer: int) -> list[Signal]:
        """Signals the method reads at one plan layer (``layer`` is non-negative)."""
        return []

    def encoder_step(self, layer: int, remaining: int, signals: dict, state, target: int | list[int],
                     counts: list[int] | None = None):  # pragma: no cover
        """Look at ``layer``'s signals and maybe prune after it. Returns (indices of the current patch tokens
        to keep, (B, t'), or None to keep them all; the new state, aligned with the survivors; the number
        of real tokens each image now has). ``remaining`` = layers from ``layer`` to the last plan layer
        (0 = last: must reach ``target`` patches; a list: one target per row, e.g. LLaVA-NeXT's views, each
        to its quota). ``counts`` (None: all t are real) says how many of
        each image's t tokens are real in a batch whose images keep different counts: its rows are padded
        to the longest, real tokens first (ascending), and the patcher masks the padding in attention.
        The patcher keeps [CLS]."""
        raise NotImplementedError
