"""A synthetic visual task whose answer needs the image: the multimodal counterpart of data/synthetic.py.

Each problem is a tiny picture drawn with PIL (coloured squares and circles on a 16-px cell grid, digits in
32-px blocks) and a question that only the picture can answer ("How many shapes are in the image?", "What is
the sum of the two digits?", "How many shapes are in the top half?"). The teacher writes the demo's
caption / think / answer format: the `<caption>` lists what the image shows (algorithms/perception.py renders
and checks those lines), `<think>` does the arithmetic as `a op b = value unit`, `<answer>` holds an integer.

Sizes are multiples of 32 px (patch 16 x merge 2), so no backend resizes them: 64 x 64 (difficulty 0) is 4 LLM
tokens, 96 x 96 (difficulty 1, 2) is 9. Shapes sit inside one 16-px cell (one vision patch) and digits inside
one 32-px block (one merged token), which a tiny vision tower can learn to read in minutes.

Difficulty 0: one step (two colour groups to add, or two digits to add). Difficulty 1: three groups, a shape
named in the question among distractors, or a digit times a count. Difficulty 2: groups placed in quadrants,
"how many in the top / bottom half". An image-blind control draws the same problems on blank images
(`render(problem, blind=True)`): what a model scores there is what it gets from the question alone.

Everything is a pure function of the seed. The flawed "student" of the warm-up pairs re-derives a consistent
but wrong solution from a misread fact or an arithmetic slip, as in the text task. Writers: visual_writers.py.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

from prism_mcore.algorithms.perception import COLOURS, QUADRANTS, SHAPES, fact_text
from prism_mcore.data.synthetic import caption_text, cot_text

DATA_SOURCE = "prism_visual"
CELL = 16  # px: one vision patch
BLOCK = 32  # px: one merged LLM token (patch x merge)
SIZES = {0: 64, 1: 96, 2: 96}  # image side by difficulty
BACKGROUND = (24, 24, 24)
RGB = {"red": (230, 50, 40), "green": (40, 190, 70), "blue": (60, 110, 250), "yellow": (240, 220, 40)}
DIGIT_COLOUR = (245, 245, 245)
STUDENT_KINDS = ("wrong_fact", "wrong_step", "wrong_answer", "missing_tags")


@dataclass
class VisualProblem:
    """`facts` (mappings, see algorithms/perception.py) are what the image shows and the caption must say;
    `steps` the reasoning. `params` rebuild the text (the student misreads them); `shapes` / `digits` are where
    things are drawn: (shape, colour, x, y) and (digit, x, y), top-left corners in px."""

    question: str
    facts: list[dict[str, Any]]
    steps: list[str]
    answer: str
    template: str
    difficulty: int
    size: int
    params: dict[str, Any] = field(default_factory=dict)
    shapes: list[tuple[str, str, int, int]] = field(default_factory=list)
    digits: list[tuple[int, int, int]] = field(default_factory=list)


class _Trace:
    """Records each step as `a op b = value unit`; a `slip=(step, delta)` adds delta to that step's result and
    later steps carry the wrong value on."""

    _OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                                   "*": lambda a, b: a * b}

    def __init__(self, slip: tuple[int, int] | None = None):
        self.slip, self.steps = slip, []

    def step(self, a: int, op: str, b: int, unit: str) -> int:
        value = self._OPS[op](a, b)
        if self.slip is not None and self.slip[0] == len(self.steps):
            value += self.slip[1]
        self.steps.append(f"{a} {op} {b} = {value} {unit}".rstrip())
        return value

    def total(self, values: list[int], unit: str) -> int:
        out = values[0]
        for v in values[1:]:
            out = self.step(out, "+", v, unit)
        return out


def _group(count: int, colour: str, shape: str, where: str | None = None) -> dict[str, Any]:
    fact = {"count": count, "colour": colour, "shape": shape}
    return {**fact, "where": where} if where else fact


# ---- templates: draw(rng, difficulty) -> params; build(params, trace) -> (question, facts, answer).
# params hold "groups" [(count, colour, shape, where)] and/or "digits" [(value, side)] plus the question's
# choices; what a perception error can change is a count or a digit value. Groups are listed in an order the
# image itself shows (by quadrant, then colour in COLOURS order), so the caption's order is learnable too.

def _in_order(groups: list[list]) -> list[list]:
    return sorted(groups, key=lambda g: (QUADRANTS.index(g[3]) if g[3] else -1, COLOURS.index(g[1])))


def _draw_groups(rng: random.Random, n: int, lo: int, hi: int, shapes=SHAPES, where=None) -> list[list]:
    colours = rng.sample(COLOURS, n)
    return _in_order([[rng.randint(lo, hi), c, rng.choice(shapes), where[i] if where else None]
                      for i, c in enumerate(colours)])


def _draw_total(rng: random.Random, d: int) -> dict:
    return {"groups": _draw_groups(rng, 2 if d == 0 else 3, 1, 3 if d == 0 else 4)}


def _build_total(p: dict, t: _Trace) -> tuple[str, list, int]:
    facts = [_group(*g) for g in p["groups"]]
    return "How many shapes are in the image?", facts, t.total([g[0] for g in p["groups"]], "shapes")


def _draw_digit_sum(rng: random.Random, d: int) -> dict:
    return {"digits": [[rng.randint(0, 9), "left"], [rng.randint(0, 9), "right"]]}


def _build_digit_sum(p: dict, t: _Trace) -> tuple[str, list, int]:
    (a, _), (b, _) = p["digits"]
    facts = [{"digit": v, "where": side} for v, side in p["digits"]]
    return "What is the sum of the two digits?", facts, t.step(a, "+", b, "")


def _draw_shape_count(rng: random.Random, d: int) -> dict:
    asked = rng.choice(SHAPES)
    other = next(s for s in SHAPES if s != asked)
    colours = rng.sample(COLOURS, 3)
    groups = [[rng.randint(1, 4), colours[0], asked, None], [rng.randint(1, 4), colours[1], asked, None],
              [rng.randint(1, 4), colours[2], other, None]]
    return {"groups": _in_order(groups), "asked": asked}


def _build_shape_count(p: dict, t: _Trace) -> tuple[str, list, int]:
    facts = [_group(*g) for g in p["groups"]]
    asked = [g[0] for g in p["groups"] if g[2] == p["asked"]]
    return f"How many {p['asked']}s are in the image?", facts, t.total(asked, p["asked"] + "s")


def _draw_digit_times(rng: random.Random, d: int) -> dict:
    return {"digits": [[rng.randint(1, 9), None]], "groups": [[rng.randint(1, 5), rng.choice(COLOURS), "square", None]]}


def _build_digit_times(p: dict, t: _Trace) -> tuple[str, list, int]:
    (digit, _), (count, colour, shape, _) = p["digits"][0], p["groups"][0]
    facts = [{"digit": digit}, _group(count, colour, shape)]
    return "What is the digit times the number of squares?", facts, t.step(digit, "*", count, "")


def _draw_half(rng: random.Random, d: int) -> dict:
    half = rng.choice(("top", "bottom"))
    other = "bottom" if half == "top" else "top"
    where = [f"{half} left", f"{half} right"] + rng.sample([f"{other} left", f"{other} right"], rng.randint(1, 2))
    return {"groups": _draw_groups(rng, len(where), 1, 4, where=where), "half": half}


def _build_half(p: dict, t: _Trace) -> tuple[str, list, int]:
    facts = [_group(*g) for g in p["groups"]]
    counted = [g[0] for g in p["groups"] if g[3].startswith(p["half"])]
    return f"How many shapes are in the {p['half']} half?", facts, t.total(counted, "shapes")


TEMPLATES: dict[str, tuple[Callable, Callable]] = {
    "total": (_draw_total, _build_total),
    "digit_sum": (_draw_digit_sum, _build_digit_sum),
    "shape_count": (_draw_shape_count, _build_shape_count),
    "digit_times": (_draw_digit_times, _build_digit_times),
    "half": (_draw_half, _build_half),
}
BY_DIFFICULTY = {0: ("total", "digit_sum"), 1: ("total", "shape_count", "digit_times"), 2: ("half",)}


# ---- layout: where each thing is drawn ----------------------------------------------------------------------

def _cells(size: int, where: str | None) -> list[tuple[int, int]]:
    """Cell (column, row) indices, within a quadrant when `where` names one."""
    n = size // CELL
    cols, rows = range(n), range(n)
    if where:
        vertical, horizontal = where.split()
        rows = range(n // 2) if vertical == "top" else range(n // 2, n)
        cols = range(n // 2) if horizontal == "left" else range(n // 2, n)
    return [(c, r) for r in rows for c in cols]


def _layout(p: dict, size: int, rng: random.Random) -> tuple[list, list]:
    digits, taken = [], set()
    blocks = [(x, y) for y in range(0, size, BLOCK) for x in range(0, size, BLOCK)]
    for value, side in p.get("digits", []):
        x = 0 if side == "left" else size // 2  # a block in the named half, or anywhere
        spots = [(bx, by) for bx, by in blocks if side is None or x <= bx < x + size // 2]
        bx, by = rng.choice([s for s in spots if s not in taken])
        taken.add((bx, by))
        digits.append((value, bx, by))
    used = {(bx // CELL + i, by // CELL + j) for bx, by in taken for i in (0, 1) for j in (0, 1)}
    shapes = []
    for count, colour, shape, where in p.get("groups", []):
        free = [c for c in _cells(size, where) if c not in used]
        for col, row in rng.sample(free, count):
            used.add((col, row))
            # a 12-px shape jittered inside its 16-px cell: it never crosses into a neighbouring patch
            shapes.append((shape, colour, col * CELL + rng.randint(0, 3), row * CELL + rng.randint(0, 3)))
    return shapes, digits


def _build(template: str, params: dict, difficulty: int, slip: tuple[int, int] | None = None
           ) -> tuple[VisualProblem, _Trace]:
    trace = _Trace(slip)
    question, facts, answer = TEMPLATES[template][1](params, trace)
    return VisualProblem(question, facts, trace.steps, str(answer), template, difficulty, SIZES[difficulty],
                         params), trace


def make_problems(n: int, seed: int, difficulty: int = 0) -> list[VisualProblem]:
    """`n` problems, the same for the same (seed, difficulty); problem i does not depend on `n`."""
    if difficulty not in SIZES:
        raise ValueError(f"difficulty must be one of {sorted(SIZES)}, got {difficulty}")
    rng = random.Random(f"prism-visual/{seed}/{difficulty}")  # str seeds hash the same in every process
    out = []
    for _ in range(n):
        name = rng.choice(BY_DIFFICULTY[difficulty])
        params = TEMPLATES[name][0](rng, difficulty)
        problem, _ = _build(name, params, difficulty)
        problem.shapes, problem.digits = _layout(params, problem.size, rng)
        out.append(problem)
    return out


# ---- rendering ----------------------------------------------------------------------------------------------

def render(p: VisualProblem, blind: bool = False):
    """The problem's RGB image (PIL); `blind`: the same size, background only (the image-blind control)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (p.size, p.size), BACKGROUND)
    if blind:
        return image
    draw = ImageDraw.Draw(image)
    for shape, colour, x, y in p.shapes:
        box = (x, y, x + 11, y + 11)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=RGB[colour])
    # Pillow's bundled scalable font: no system fonts needed (loaded only for images with digits)
    font = ImageFont.load_default(size=26) if p.digits else None
    for value, x, y in p.digits:
        draw.text((x + BLOCK / 2, y + BLOCK / 2), str(value), fill=DIGIT_COLOUR, font=font, anchor="mm")
    return image


def png_bytes(p: VisualProblem, blind: bool = False) -> bytes:
    import io

    buf = io.BytesIO()
    render(p, blind).save(buf, format="PNG")
    return buf.getvalue()


# ---- text: prompt, teacher, student -------------------------------------------------------------------------

def user_text(p: VisualProblem) -> str:
    """The user turn with its image placeholder (LLaMA-Factory / PRISM parquet style)."""
    return "<image>" + p.question


def prompt_messages(p: VisualProblem) -> list[dict[str, str]]:
    """The user turn alone: no system prompt. The tiny demo policy learns the format from SFT either way, and
    without the 37 format-instruction tokens its attention finds the image sooner (600 SFT steps x 8 from the
    pretrained tower: caption F1 0.42 against 0.26, held-out accuracy 27% against 20%; docs/pipeline.md).
    The warm-up pairs say so too (`"system": ""`), so the discriminator sees the prompts the policy sees."""
    return [{"role": "user", "content": user_text(p)}]


def caption_lines(p: VisualProblem) -> list[str]:
    return [fact_text(f) for f in p.facts]


def teacher_caption(p: VisualProblem) -> str:
    return caption_text(caption_lines(p))


def teacher_cot(p: VisualProblem) -> str:
    return cot_text(p.steps, p.answer)


def teacher_response(p: VisualProblem) -> str:
    return teacher_caption(p) + "\n" + teacher_cot(p)


def _delta(rng: random.Random) -> int:
    return rng.choice((-2, -1, 1, 2))


def _misread(p: VisualProblem, rng: random.Random) -> VisualProblem | None:
    """The problem as a student that misread one count or digit sees it (None if no misreading changes the
    answer); its caption and reasoning agree with the misreading."""
    keys = [("groups", i) for i in range(len(p.params.get("groups", [])))] + \
           [("digits", i) for i in range(len(p.params.get("digits", [])))]
    for _ in range(20):
        kind, i = rng.choice(keys)
        items = [list(x) for x in p.params[kind]]
        lo, hi = (1, 9) if kind == "groups" else (0, 9)
        items[i][0] = min(hi, max(lo, items[i][0] + _delta(rng)))
        seen, _ = _build(p.template, {**p.params, kind: items}, p.difficulty)
        if seen.answer != p.answer:
            return seen
    return None


def _slipped(p: VisualProblem, rng: random.Random) -> VisualProblem:
    for _ in range(20):
        slipped, _ = _build(p.template, p.params, p.difficulty, (rng.randrange(len(p.steps)), _delta(rng)))
        if slipped.answer != p.answer:
            return slipped
    raise AssertionError("unreachable: a slip of +-1 or +-2 in a chain of + and * always changes the answer")


def student_segments(p: VisualProblem, rng: random.Random, kind: str | None = None) -> tuple[str, str]:
    """(caption, cot) of a plausible but flawed response; `kind` in STUDENT_KINDS (random if None):
    wrong_fact (misread count or digit, carried through), wrong_step (an arithmetic slip), wrong_answer (right
    work, another final answer), missing_tags (right content, broken format)."""
    kind = kind or rng.choice(STUDENT_KINDS)
    if kind == "wrong_fact":
        seen = _misread(p, rng)
        if seen is not None:
            return caption_text(caption_lines(seen)), teacher_cot(seen)
        kind = "wrong_step"
    if kind == "wrong_step":
        return teacher_caption(p), teacher_cot(_slipped(p, rng))
    if kind == "wrong_answer":
        right = int(p.answer)
        wrong = right + _delta(rng)
        return teacher_caption(p), cot_text(p.steps, str(wrong if wrong >= 0 else right + 1))
    if kind == "missing_tags":
        caption, cot = teacher_caption(p), teacher_cot(p)
        how = rng.randrange(3)
        if how == 0:  # no perception block
            return "", cot
        if how == 1:  # the caption never closed
            return caption.replace("</caption>", ""), cot
        return caption, cot.replace("<think>\n", "").replace("\n</think>", "")
    raise ValueError(f"unknown student kind {kind!r}; known: {STUDENT_KINDS}")


def warmup_record(p: VisualProblem, rng: random.Random) -> dict[str, str]:
    """One warm-up line without its `image` (the writer adds it). Both comparisons are informative: a flaw that
    leaves one segment equal to the teacher's gets a second flaw in that segment."""
    kind = rng.choice(STUDENT_KINDS)
    caption, cot = student_segments(p, rng, kind)
    if not caption or caption == teacher_caption(p):
        seen = _misread(p, rng)
        caption = caption_text(caption_lines(seen) if seen is not None else caption_lines(p)[:-1] or ["nothing"])
    if cot == teacher_cot(p):
        cot = teacher_cot(_slipped(p, rng))
    return {"prompt": p.question, "teacher_caption": teacher_caption(p), "teacher_cot": teacher_cot(p),
            "student_caption": caption, "student_cot": cot, "student_kind": kind}
