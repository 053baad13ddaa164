"""Synthetic VQA scenes for the embedded model: seeded, deterministic, pure numpy.

A scene is a 224 x 224 RGB picture: a textured background (noise, stripes or checks in muted colours),
clutter (thin strokes and low-contrast blobs, never asked about) and 1..6 small objects, each a
``circle``, ``square``, ``triangle`` or ``cross`` in one of six saturated colours, 22..34 px wide (a few
14 px patches each), not overlapping, and never centred on the image's midlines (so "where" has one
answer). Questions whose answers need spatial detail:

- ``color``:  "what color is the {shape} ?"          (only shapes that occur once)     -> a colour
- ``count``:  "how many {color} objects are there ?"  (colours present or absent)       -> 0..6
- ``exist``:  "is there a {color} {shape} ?"          (yes/no, balanced)                -> yes / no
- ``where``:  "where is the {color} {shape} ?"        (unique objects)                  -> top left, ...
- ``shape``:  "what shape is the {color} object ?"    (only colours that occur once)    -> a shape

Everything is drawn with numpy arithmetic from ``numpy.random.default_rng([seed, index])``: item
``index`` of a split is the same bytes on every machine, whatever else was generated before. The
held-out questions (``test_items``) are asked about scenes of the ``test`` seed, balanced over question
types and, within each type, over answers; training uses other seeds.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

SIZE = 224
PATCH = 14
COLORS = {
    "red": (215, 35, 35), "green": (35, 165, 55), "blue": (40, 75, 225),
    "yellow": (235, 205, 35), "purple": (145, 55, 185), "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = ((128, 128, 128), (175, 170, 160), (95, 100, 105), (150, 160, 170), (185, 180, 150), (115, 125, 110))
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
QTYPES = ("color", "count", "exist", "where", "shape")
SEEDS = {"train": 1, "test": 1_000_003, "val": 2_000_003}
TEST_SIZE = 1000
MARGIN = 8  # object centres keep this far from the midlines
QUESTIONS = {  # the one wording of each question type: the held-out split and training share it
    "color": "what color is the {shape} ?", "count": "how many {color} objects are there ?",
    "exist": "is there a {color} {shape} ?", "where": "where is the {color} {shape} ?",
    "shape": "what shape is the {color} object ?",
}


def question(qtype: str, color: str = "", shape: str = "") -> str:
    return QUESTIONS[qtype].format(color=color, shape=shape)


@dataclass
class Obj:
    shape: str
    color: str
    cx: float
    cy: float
    r: float  # half width

    @property
    def where(self) -> str:
        return f"{'top' if self.cy < SIZE / 2 else 'bottom'} {'left' if self.cx < SIZE / 2 else 'right'}"

    def box(self):
        return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)


@dataclass
class QA:
    qtype: str
    question: str
    answer: str


@dataclass
class Scene:
    image: np.ndarray  # (224, 224, 3) uint8
    objects: list[Obj]
    qas: list[QA] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)  # one bool (224, 224) mask per object

    def pil(self):
        from PIL import Image

        return Image.fromarray(self.image)


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5


def shape_mask(shape: str, cx: float, cy: float, r: float, angle: float = 0.0) -> np.ndarray:
    x, y = _XX - cx, _YY - cy
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        x, y = c * x + s * y, -s * x + c * y
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        return (np.abs(x) <= r * 0.85) & (np.abs(y) <= r * 0.85)
    if shape == "triangle":  # apex up, base at the bottom
        return (y <= r * 0.8) & (y >= -r) & (np.abs(x) <= (y + r) * 0.5 * 1.05)
    if shape == "cross":
        arm = r * 0.34
        return ((np.abs(x) <= arm) & (np.abs(y) <= r)) | ((np.abs(y) <= arm) & (np.abs(x) <= r))
    raise ValueError(shape)


def _background(rng) -> np.ndarray:
    base = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], np.float64)
    base = base + rng.uniform(-12, 12, 3)
    img = np.broadcast_to(base, (SIZE, SIZE, 3)).copy()
    kind = rng.integers(3)
    amp = rng.uniform(8, 20)
    if kind == 0:  # stripes at a random angle
        a, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
        img += amp * np.sin((np.cos(a) * _XX + np.sin(a) * _YY) * 2 * np.pi / period)[..., None]
    elif kind == 1:  # checks
        cell = rng.integers(8, 24)
        img += amp * (((_XX // cell + _YY // cell) % 2) * 2 - 1)[..., None]
    else:  # smooth blotches: low-resolution noise, upsampled
        coarse = rng.standard_normal((8, 8))
        img += amp * np.kron(coarse, np.ones((28, 28)))[..., None]
    img += rng.normal(0, 6, (SIZE, SIZE, 1))  # grain
    return img


def _clutter(img, rng):
    """Strokes and faint blobs: never objects, never asked about."""
    for _ in range(rng.integers(2, 6)):  # thin strokes in dull colours
        x0, y0 = rng.uniform(0, SIZE, 2)
        a, length, width = rng.uniform(0, np.pi), rng.uniform(30, 120), rng.uniform(1.0, 2.5)
        dx, dy = np.cos(a), np.sin(a)
        t = np.clip((_XX - x0) * dx + (_YY - y0) * dy, 0, length)
        d = np.hypot(_XX - (x0 + t * dx), _YY - (y0 + t * dy))
        gray = rng.uniform(40, 220)
        img[d <= width] = gray + rng.uniform(-15, 15, 3)
    for _ in range(rng.integers(1, 4)):  # low-contrast blobs, coloured like the background
        cx, cy, r = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(8, 20)
        m = (_XX - cx) ** 2 + ((_YY - cy) * rng.uniform(0.5, 1.5)) ** 2 <= r * r
        img[m] = img[m] + rng.uniform(-25, 25)


def _place(rng, n):
    objs = []
    for _ in range(200):
        if len(objs) == n:
            break
        r = rng.uniform(11, 17)
        cx, cy = rng.uniform(r + 2, SIZE - r - 2, 2)
        if abs(cx - SIZE / 2) < MARGIN or abs(cy - SIZE / 2) < MARGIN:
            continue
        if all(np.hypot(cx - o.cx, cy - o.cy) > r + o.r + 4 for o in objs):
            objs.append(Obj(SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))], cx, cy, r))
    return objs


def _questions(objs, rng) -> list[QA]:
    """Every question type that has a well-defined answer in this scene, one of each (random choice)."""
    qas = []
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    unique_shape = [o for o in objs if shapes.count(o.shape) == 1]
    if unique_shape:
        o = unique_shape[rng.integers(len(unique_shape))]
        qas.append(QA("color", question("color", shape=o.shape), o.color))
    c = list(COLORS)[rng.integers(len(COLORS))] if rng.random() < 0.25 else colors[rng.integers(len(colors))]
    qas.append(QA("count", question("count", c), NUMBERS[colors.count(c)]))
    pairs = {(o.color, o.shape) for o in objs}
    if rng.random() < 0.5:
        col, sh = sorted(pairs)[rng.integers(len(pairs))]
        qas.append(QA("exist", question("exist", col, sh), "yes"))
    else:
        absent = [(col, sh) for col in COLORS for sh in SHAPES if (col, sh) not in pairs]
        # half of the "no" cases share the colour or the shape of an object, so one word is not enough
        near = [p for p in absent if p[0] in colors or p[1] in shapes]
        pool = near if near and rng.random() < 0.7 else absent
        col, sh = pool[rng.integers(len(pool))]
        qas.append(QA("exist", question("exist", col, sh), "no"))
    unique = [o for o in objs if sum(p.color == o.color and p.shape == o.shape for p in objs) == 1]
    if unique:
        o = unique[rng.integers(len(unique))]
        qas.append(QA("where", question("where", o.color, o.shape), o.where))
    unique_color = [o for o in objs if colors.count(o.color) == 1]
    if unique_color:
        o = unique_color[rng.integers(len(unique_color))]
        qas.append(QA("shape", question("shape", o.color), o.shape))
    return qas


def make_scene(seed: int, index: int, min_objects: int = 1, max_objects: int = 6, repeat: int = 0) -> Scene:
    """Scene ``index`` of the stream ``seed``: objects of independent shapes and colours, or, with
    ``repeat`` = m > 0, exactly m of them (as many as fit, if fewer) in one colour and the others not."""
    rng = np.random.default_rng([seed, index])
    img = _background(rng)
    _clutter(img, rng)
    objs = _place(rng, int(rng.integers(max(min_objects, repeat), max_objects + 1)))
    if repeat:
        _repeat_color(objs, min(repeat, len(objs)), rng)
    masks = []
    for o in objs:
        angle = rng.uniform(-0.3, 0.3) if o.shape != "circle" else 0.0
        m = shape_mask(o.shape, o.cx, o.cy, o.r, angle)
        img[m] = np.array(COLORS[o.color], np.float64) + rng.uniform(-18, 18, 3)
        masks.append(m)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Scene(image, objs, _questions(objs, rng), masks)


def _repeat_color(objs, m: int, rng):
    names = list(COLORS)
    color = names[rng.integers(len(names))]
    chosen = set(rng.choice(len(objs), m, replace=False).tolist())
    others = [c for c in names if c != color]
    for i, o in enumerate(objs):
        o.color = color if i in chosen else (o.color if o.color != color else others[rng.integers(len(others))])


#: Every third training scene repeats one colour on three or four objects (alternately): with colours
#: drawn independently, three or more objects of one colour are rare (a few % of scenes), too rare for
#: the model to learn counting beyond two (it had 0 of 20 "four" answers right on the balanced split).
TRAIN_REPEAT = (3, 4)


def train_scene(index: int) -> Scene:
    """Training scene ``index`` (the stream the features are computed on and the prior is counted from)."""
    repeat = TRAIN_REPEAT[index // 3 % len(TRAIN_REPEAT)] if index % 3 == 2 else 0
    return make_scene(SEEDS["train"], index, repeat=repeat)


def split(name: str = "test", n: int | None = None, start: int = 0, **kw):
    """Scenes ``start .. start+n-1`` of a split (``test`` has TEST_SIZE items; one question each)."""
    if name not in SEEDS:
        raise ValueError(f"split must be one of {sorted(SEEDS)}; got {name!r}")
    n = TEST_SIZE if n is None and name == "test" else n
    for i in range(start, start + n):
        yield make_scene(SEEDS[name], i, **kw)


#: The answers the held-out split cycles through within each question type, so that every value is
#: asked equally often: a skewed split (mostly "one" among counts) would hide what a model cannot do.
ANSWERS = {"color": tuple(COLORS), "count": NUMBERS[:5], "exist": ("yes", "no"), "where": POSITIONS,
           "shape": SHAPES}
SEARCH = 2000  # scenes item i may draw from: test-seed scenes i*SEARCH .. i*SEARCH+SEARCH-1


def _ask(objs, qtype: str, answer: str, rng) -> QA | None:
    """A well-posed ``qtype`` question about these objects whose answer is ``answer``, or None."""
    shapes, colors = [o.shape for o in objs], [o.color for o in objs]
    if qtype == "count":
        pool = [c for c in COLORS if NUMBERS[colors.count(c)] == answer]
        return QA(qtype, question(qtype, pool[rng.integers(len(pool))]), answer) if pool else None
    if qtype == "exist":
        pairs = sorted({(o.color, o.shape) for o in objs}) if answer == "yes" else [
            (c, sh) for c in COLORS for sh in SHAPES if not any(o.color == c and o.shape == sh for o in objs)]
        col, sh = pairs[rng.integers(len(pairs))]
        return QA(qtype, question(qtype, col, sh), answer)
    if qtype == "color":
        pool = [o for o in objs if shapes.count(o.shape) == 1 and o.color == answer]
    elif qtype == "shape":
        pool = [o for o in objs if colors.count(o.color) == 1 and o.shape == answer]
    else:  # where: objects unique by colour and shape
        pool = [o for o in objs if sum(p.color == o.color and p.shape == o.shape for p in objs) == 1 and o.where == answer]
    if not pool:
        return None
    o = pool[rng.integers(len(pool))]
    return QA(qtype, question(qtype, o.color, o.shape), answer)


def test_items(n: int = TEST_SIZE, start: int = 0) -> list[dict]:
    """The held-out VQA items: question types in rotation, and within a type its answers in rotation
    (``ANSWERS``: counts zero..four, every colour, shape and position, yes and no), so both are balanced.

    Item i asks about the first scene of the test seed, from ``i * SEARCH`` on, that has a well-posed
    question of its type with its answer (which one, if several, is drawn from ``[seed, scene]``), so item
    i does not depend on the items before it. Each item: ``{"index", "scene", "image" (PIL), "qtype",
    "question", "answer", "objects"}``.
    """
    items = []
    for i in range(start, start + n):
        index, qa = _test_question(i)
        scene = make_scene(SEEDS["test"], index)
        items.append({"index": i, "scene": index, "image": scene.pil(), "qtype": qa.qtype, "question": qa.question,
                      "answer": qa.answer, "objects": scene.objects})
    return items


@functools.lru_cache(maxsize=None)
def _test_question(i: int) -> tuple[int, QA]:
    """(scene index, question) of held-out item i; searched once per process (a "four" may take ~100 scenes)."""
    qtype = QTYPES[i % len(QTYPES)]
    values = ANSWERS[qtype]
    answer = values[(i // len(QTYPES)) % len(values)]
    for index in range(i * SEARCH, (i + 1) * SEARCH):
        qa = _ask(make_scene(SEEDS["test"], index).objects, qtype, answer,
                  np.random.default_rng([SEEDS["test"], index, 1]))
        if qa is not None:
            return index, qa
    raise RuntimeError(f"no test scene in {i * SEARCH}..{(i + 1) * SEARCH - 1} answers {qtype}={answer!r}")


def prompt(question: str) -> str:
    """The LLaVA-1.5 prompt the embedded model was trained on."""
    return f"USER: <image>\n{question} ASSISTANT:"


def vocabulary() -> list[str]:
    """Every word the questions, answers and prompt use (the word-level tokenizer's vocabulary)."""
    words = {"USER", ":", "ASSISTANT", "?", "what", "color", "is", "the", "how", "many", "objects", "are", "there",
             "a", "where", "shape", "object", "yes", "no", "top", "bottom", "left", "right"}
    words |= set(COLORS) | set(SHAPES) | set(NUMBERS)
    return sorted(words)
