"""A synthetic, verifiable stand-in for PRISM's multimodal data, for the CPU demo and the tests.

Each problem describes a small "scene" in words (a box of marbles, a purse of coins, ...) and asks a
question that takes a few arithmetic steps. The scene plays the part of the image: the teacher's
`<caption>` lists its objects and counts (perception), `<think>` does the arithmetic (reasoning) and
`<answer>` holds an integer in 0..99 that the rule-based reward can check. Small answers are far more
common than large ones, so the floor to beat is not a 1% uniform guess but always giving the most common
answer (5-13% on held-out sets; `trainer/report.py: prior_accuracy`). The wording is templated. The demo's
tiny policy learns the format within a hundred SFT steps of 8, to copy the facts into its caption after
300-600 and the arithmetic after that: 32% after the demo's 1,000 steps on 8,000 unique demonstrations
(docs/pipeline.md).

Everything is deterministic given the seed. Problems are built from integer parameters by pure
functions, which lets the flawed "student" re-derive a consistent but wrong solution from a
misread count or an arithmetic slip, as a weaker model would, instead of editing text.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

# The original's XML prompt (spec section 0) in a few words. Short on purpose: a tiny policy starts out
# attending evenly over the whole prompt, and a long fixed preamble dilutes the question it has to copy the
# facts from. The demo's SFT, 430 steps on 256 held-out prompts: 9.8% accuracy with this 37-token prompt,
# 6.2% with a 70-token one in the original's words.
SYSTEM_PROMPT = ("Describe what you see, reason step by step, then answer, as <caption>\n- facts\n</caption>\n"
                 "<think>\nsteps\n</think>\n<answer>\nanswer\n</answer>")
DATA_SOURCE = "prism_synthetic"
MAX_ANSWER = 99
STUDENT_KINDS = ("wrong_fact", "wrong_step", "wrong_answer", "missing_tags")


@dataclass
class Problem:
    """`facts` is what a caption of the scene would say; `steps` the reasoning, one sentence each.
    `template` and `params` rebuild the problem (the student uses them to go wrong consistently)."""

    question: str
    facts: list[str]
    steps: list[str]
    answer: str
    template: str = ""
    params: dict[str, int] = field(default_factory=dict)


class _Trace:
    """Records each arithmetic step as `a op b = value unit`. A `slip=(step, delta)` adds `delta` to that step's
    result, and later steps carry the wrong value on, like a real arithmetic mistake."""

    _OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                                   "*": lambda a, b: a * b}

    def __init__(self, slip: tuple[int, int] | None = None):
        self.slip = slip
        self.steps: list[str] = []
        self.values: list[int] = []

    def step(self, a: int, op: str, b: int, unit: str) -> int:
        value = self._OPS[op](a, b)
        if self.slip is not None and self.slip[0] == len(self.steps):
            value += self.slip[1]
        self.steps.append(f"{a} {op} {b} = {value} {unit}")
        self.values.append(value)
        return value


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun if n == 1 else noun + 's'}"


def _are(n: int) -> str:
    return "is" if n == 1 else "are"


# ---- templates: draw(rng, difficulty) -> params; build(params, trace) -> (question, facts, answer).
# Difficulty adds objects (more facts to read) and operations (more steps). `scene` names the params
# that appear in the facts, the ones a perception error can get wrong.

_COLOURS = ("red", "blue", "green", "yellow")


def _draw_marbles(rng: random.Random, d: int) -> dict[str, int]:
    n = min(d + 1, len(_COLOURS))
    p = {f"c{i}": rng.randint(2, 20) for i in range(n)}
    p["removed"] = rng.randint(1, p["c0"])
    if d >= 2:
        p["added"] = rng.randint(1, 9)
    return p


def _build_marbles(p: dict[str, int], t: _Trace) -> tuple[str, list[str], int]:
    counts = [p[f"c{i}"] for i in range(sum(k.startswith("c") for k in p))]
    facts = [_plural(c, _COLOURS[i] + " marble") for i, c in enumerate(counts)]
    total = counts[0]
    for i, c in enumerate(counts[1:], 1):
        total = t.step(total, "+", c, "marbles")
    total = t.step(total, "-", p["removed"], "marbles")
    events = f"{_plural(p['removed'], 'red marble')} {_are(p['removed'])} removed"
    if "added" in p:
        total = t.step(total, "+", p["added"], "marbles")
        events += f" and {_plural(p['added'], 'blue marble')} {_are(p['added'])} added"
    question = (f"A box holds {_join([_plural(c, _COLOURS[i] + ' marble') for i, c in enumerate(counts)])}. "
                f"Then {events}. How many marbles are in the box now?")
    return question, facts, total


def _draw_shelves(rng: random.Random, d: int) -> dict[str, int]:
    p = {"shelves": rng.randint(2, 9), "per_shelf": rng.randint(2, 9)}
    p["taken"] = rng.randint(1, p["shelves"] * p["per_shelf"])
    if d >= 2:
        p["boxed"] = rng.randint(1, 12)
    if d >= 3:
        p["stacked"] = rng.randint(1, 9)
    return p


def _build_shelves(p: dict[str, int], t: _Trace) -> tuple[str, list[str], int]:
    facts = [_plural(p["shelves"], "shelf").replace("shelfs", "shelves"),
             f"{_plural(p['per_shelf'], 'book')} on each shelf"]
    scene = f"A bookcase has {facts[0]} with {facts[1]}."
    total = t.step(p["shelves"], "*", p["per_shelf"], "books")
    for key, where in (("boxed", "in a box next to it"), ("stacked", "stacked on the floor")):
        if key in p:
            facts.append(f"{_plural(p[key], 'book')} {where}")
            scene += f" There {_are(p[key])} also {facts[-1]}."
            total = t.step(total, "+", p[key], "books")
    total = t.step(total, "-", p["taken"], "books")
    question = f"{scene} {_plural(p['taken'], 'book')} {_are(p['taken'])} taken away. " \
               "How many books are left?"
    return question, facts, total


_COINS = (("5-cent", 5), ("10-cent", 10), ("2-cent", 2), ("20-cent", 20))


def _few(d: int) -> int:
    """Upper bound on a multiplied count: more kinds of thing means fewer of each, so sums stay <= 99."""
    return {1: 9, 2: 6}.get(d, 4)


def _kinds(p: dict[str, int], table: tuple) -> list[tuple]:
    """(kind, count) pairs: difficulty 0 names one kind of any sort in `kind`, else kinds 0, 1, ..."""
    counts = [p[k] for k in sorted(k for k in p if k.startswith("n"))]
    return [(table[p["kind"]], counts[0])] if "kind" in p else [(table[i], c) for i, c in enumerate(counts)]


def _draw_coins(rng: random.Random, d: int) -> dict[str, int]:
    if d == 0:
        return {"kind": rng.randrange(len(_COINS)), "n0": rng.randint(1, 9)}
    return {f"n{i}": rng.randint(1, _few(d)) for i in range(min(d + 1, len(_COINS)))}


def _build_coins(p: dict[str, int], t: _Trace) -> tuple[str, list[str], int]:
    kinds = _kinds(p, _COINS)
    facts = [_plural(n, name + " coin") for (name, _), n in kinds]
    total = None
    for (name, value), n in kinds:
        part = t.step(n, "*", value, "cents")
        total = part if total is None else t.step(total, "+", part, "cents")
    question = (f"A purse holds {_join([_plural(n, name + ' coin') for (name, _), n in kinds])}. "
                "How many cents are in the purse?")
    return question, facts, total


_ANIMALS = (("chicken", 2), ("cow", 4), ("spider", 8), ("ant", 6))


def _draw_legs(rng: random.Random, d: int) -> dict[str, int]:
    if d == 0:
        return {"kind": rng.randrange(len(_ANIMALS)), "n0": rng.randint(1, 9)}
    return {f"n{i}": rng.randint(1, _few(d)) for i in range(min(d + 1, len(_ANIMALS)))}


def _build_legs(p: dict[str, int], t: _Trace) -> tuple[str, list[str], int]:
    kinds = _kinds(p, _ANIMALS)
    facts = [_plural(n, name) for (name, _), n in kinds]
    total = None
    for (name, legs), n in kinds:
        part = t.step(n, "*", legs, "legs")
        total = part if total is None else t.step(total, "+", part, "legs")
    question = f"A farm has {_join([_plural(n, name) for (name, _), n in kinds])}. How many legs do they have in all?"
    return question, facts, total


def _draw_garden(rng: random.Random, d: int) -> dict[str, int]:
    p = {"tulips": rng.randint(10, 40), "roses": rng.randint(2, 25), "picked": rng.randint(1, 9)}
    if d >= 2:
        p["planted"] = rng.randint(1, 9)
    if d >= 3:
        p["daisies"] = rng.randint(2, 20)
    return p


def _build_garden(p: dict[str, int], t: _Trace) -> tuple[str, list[str], int]:
    facts = [_plural(p["tulips"], "tulip"), _plural(p["roses"], "rose")]
    flowers = [_plural(p["tulips"], "tulip"), _plural(p["roses"], "rose")]
    if "daisies" in p:
        facts.append(_plural(p["daisies"], "daisy").replace("daisys", "daisies"))
        flowers.append(facts[-1])
    tulips = t.step(p["tulips"], "-", p["picked"], "tulips")
    roses = p["roses"]
    events = f"{_plural(p['picked'], 'tulip')} {_are(p['picked'])} picked"
    if "planted" in p:
        roses = t.step(roses, "+", p["planted"], "roses")
        events += f" and {_plural(p['planted'], 'rose')} {_are(p['planted'])} planted"
    answer = t.step(tulips, "-", roses, "more tulips")
    question = (f"A garden has {_join(flowers)}. Then {events}. "
                "How many more tulips than roses are there now?")
    return question, facts, answer


@dataclass(frozen=True)
class _Template:
    draw: Callable[[random.Random, int], dict[str, int]]
    build: Callable[[dict[str, int], _Trace], tuple[str, list[str], int]]
    scene: Callable[[dict[str, int]], list[str]]


def _scene_keys(*fixed: str, prefix: str | None = None) -> Callable[[dict[str, int]], list[str]]:
    return lambda p: [k for k in p if k in fixed or (prefix is not None and k.startswith(prefix))]


TEMPLATES: dict[str, _Template] = {
    "marbles": _Template(_draw_marbles, _build_marbles, _scene_keys(prefix="c")),
    "shelves": _Template(_draw_shelves, _build_shelves, _scene_keys("shelves", "per_shelf", "boxed", "stacked")),
    "coins": _Template(_draw_coins, _build_coins, _scene_keys(prefix="n")),
    "legs": _Template(_draw_legs, _build_legs, _scene_keys(prefix="n")),
    "garden": _Template(_draw_garden, _build_garden, _scene_keys("tulips", "roses", "daisies")),
}


ONE_STEP = ("coins", "legs", "marbles")  # the templates with a one-step form at difficulty 0


def _build(template: str, params: dict[str, int], slip: tuple[int, int] | None = None) -> tuple[Problem, _Trace]:
    trace = _Trace(slip)
    question, facts, answer = TEMPLATES[template].build(params, trace)
    problem = Problem(question, facts, trace.steps, str(answer), template, dict(params))
    return problem, trace


def _in_range(trace: _Trace) -> bool:
    return all(0 <= v <= MAX_ANSWER for v in trace.values)


def make_problems(n: int, seed: int, difficulty: int = 1) -> list[Problem]:
    """`n` problems, the same for the same (seed, difficulty); problem i does not depend on `n`.
    Every intermediate value and the answer lie in 0..99. Difficulty 0..3; difficulty 0 is one
    arithmetic step (a count times a value, or a count minus a count), the level a tiny model trained
    for minutes on a CPU can learn."""
    if difficulty < 0:
        raise ValueError(f"difficulty must be >= 0, got {difficulty}")
    rng = random.Random(f"prism-synthetic/{seed}/{difficulty}")  # str seeds hash the same in every process
    names = sorted(ONE_STEP if difficulty == 0 else TEMPLATES)
    out = []
    while len(out) < n:
        name = rng.choice(names)
        problem, trace = _build(name, TEMPLATES[name].draw(rng, difficulty))
        if _in_range(trace):  # else redraw: keeps the answer range, hence chance accuracy, fixed
            out.append(problem)
    return out


# ---- responses. The teacher writes the default caption/think/answer format.

def caption_text(facts: Sequence[str]) -> str:
    return "<caption>\n" + "".join(f"- {f}\n" for f in facts) + "</caption>"


def cot_text(steps: Sequence[str], answer: str) -> str:
    think = "\n".join(steps)
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


def teacher_caption(p: Problem) -> str:
    return caption_text(p.facts)


def teacher_cot(p: Problem) -> str:
    return cot_text(p.steps, p.answer)


def teacher_response(p: Problem) -> str:
    return teacher_caption(p) + "\n" + teacher_cot(p)


def _nonzero_delta(rng: random.Random) -> int:
    return rng.choice((-3, -2, -1, 1, 2, 3))


def _misread(p: Problem, rng: random.Random) -> Problem | None:
    """The problem as seen by a student that misread one count in the scene (None if no misreading
    changes the answer)."""
    keys = TEMPLATES[p.template].scene(p.params)
    for _ in range(20):
        key = rng.choice(keys)
        wrong = dict(p.params, **{key: max(1, p.params[key] + _nonzero_delta(rng))})
        seen, _trace = _build(p.template, wrong)
        if seen.answer != p.answer:
            return seen
    return None


def _slipped(p: Problem, rng: random.Random) -> Problem:
    """The problem solved with one arithmetic slip, carried on to the answer."""
    for _ in range(20):
        slipped, _trace = _build(p.template, p.params, (rng.randrange(len(p.steps)), _nonzero_delta(rng)))
        if slipped.answer != p.answer:
            return slipped
    raise AssertionError("unreachable: a slip in a chain of +, -, * by >= 1 always changes the answer")


def _broken_tags(p: Problem, rng: random.Random) -> tuple[str, str]:
    """The teacher's content with the XML structure broken in one of the ways weak models break it."""
    caption, cot = teacher_caption(p), teacher_cot(p)
    how = rng.randrange(4)
    if how == 0:  # skips the perception block
        return "", cot
    if how == 1:  # never closes the caption
        return caption.replace("</caption>", ""), cot
    if how == 2:  # no think tags
        return caption, cot.replace("<think>\n", "").replace("\n</think>", "")
    return caption, cot_text(p.steps, p.answer).replace(f"<answer>\n{p.answer}\n</answer>",
                                                        f"The answer is {p.answer}.")


def student_segments(p: Problem, rng: random.Random, kind: str | None = None) -> tuple[str, str]:
    """(caption, cot) of a plausible but flawed response; `kind` in STUDENT_KINDS (random if None):
    - wrong_fact: misreads a count; caption and reasoning agree with the misreading, answer wrong;
    - wrong_step: correct caption, an arithmetic slip carried to a wrong answer;
    - wrong_answer: correct caption and steps, but a different final answer;
    - missing_tags: right content, broken format (scores 0)."""
    kind = kind or rng.choice(STUDENT_KINDS)
    if kind == "wrong_fact":
        seen = _misread(p, rng)
        if seen is not None:
            return caption_text(seen.facts), cot_text(seen.steps, seen.answer)
        kind = "wrong_step"
    if kind == "wrong_step":
        return teacher_caption(p), teacher_cot(_slipped(p, rng))
    if kind == "wrong_answer":
        right = int(p.answer)
        wrong = right + _nonzero_delta(rng)
        wrong = wrong if wrong >= 0 else right + 1
        return teacher_caption(p), cot_text(p.steps, str(wrong))
    if kind == "missing_tags":
        return _broken_tags(p, rng)
    raise ValueError(f"unknown student kind {kind!r}; known: {STUDENT_KINDS}")


def student_response(p: Problem, rng: random.Random, kind: str | None = None) -> str:
    caption, cot = student_segments(p, rng, kind)
    return f"{caption}\n{cot}" if caption else cot


def prompt_messages(p: Problem) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": p.question}]


# ---- writers, in the schemas the readers (and the original pipeline) use.

def _atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write to a sibling temp file and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return _atomic_write(path, write)


def rl_schema(with_teacher: bool = True):
    """The RL parquet schema (spec section 5); `images` holds HF-datasets style {bytes, path} structs."""
    import pyarrow as pa

    fields = [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string()),
                                    ("equivalent_answers", pa.list_(pa.string()))])),
        ("extra_info", pa.struct([("index", pa.int64())])),
    ]
    if with_teacher:
        fields += [("teacher_caption", pa.string()), ("teacher_cot", pa.string())]
    return pa.schema(fields)


def write_rl_parquet(problems: Sequence[Problem], path: str | os.PathLike, with_teacher: bool = True) -> Path:
    """One row per problem. Teacher strings include their tags: `teacher_caption` is the
    `<caption>` block, `teacher_cot` the `<think>` block, a newline and the `<answer>` block."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, p in enumerate(problems):
        row = {"data_source": DATA_SOURCE, "prompt": prompt_messages(p), "images": [], "ability": "math",
               "reward_model": {"style": "rule", "ground_truth": p.answer, "equivalent_answers": []},
               "extra_info": {"index": i}}
        if with_teacher:
            row.update(teacher_caption=teacher_caption(p), teacher_cot=teacher_cot(p))
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=rl_schema(with_teacher))
    return _atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_sft_jsonl(problems: Sequence[Problem], path: str | os.PathLike, fmt: str = "messages") -> Path:
    """SFT demonstrations. `messages`: {"messages": [system, user, assistant]}. `sharegpt`: LLaMA-Factory's
    sharegpt form, {"conversations": [{"from": "human"|"gpt", "value": ...}], "system": ...}."""
    if fmt == "messages":
        rows = [{"messages": prompt_messages(p) + [{"role": "assistant", "content": teacher_response(p)}]}
                for p in problems]
    elif fmt == "sharegpt":
        rows = [{"conversations": [{"from": "human", "value": p.question},
                                   {"from": "gpt", "value": teacher_response(p)}],
                 "system": SYSTEM_PROMPT} for p in problems]
    else:
        raise ValueError(f"unknown SFT format {fmt!r}; expected 'messages' or 'sharegpt'")
    return _write_jsonl(path, rows)


def warmup_record(p: Problem, rng: random.Random) -> dict[str, str]:
    """One warm-up line (spec section 2). Both of its comparisons must be informative, so a flaw that
    leaves one segment equal to the teacher's gets a second flaw in that segment."""
    kind = rng.choice(STUDENT_KINDS)
    caption, cot = student_segments(p, rng, kind)
    if not caption or caption == teacher_caption(p):
        seen = _misread(p, rng)
        caption = caption_text(seen.facts if seen is not None else p.facts[:-1] or ["nothing"])
    if cot == teacher_cot(p):
        cot = teacher_cot(_slipped(p, rng))
    return {"prompt": p.question, "teacher_caption": teacher_caption(p), "teacher_cot": teacher_cot(p),
            "student_caption": caption, "student_cot": cot, "student_kind": kind}


def write_warmup_jsonl(problems: Sequence[Problem], path: str | os.PathLike, seed: int) -> Path:
    rng = random.Random(f"prism-warmup/{seed}")
    return _write_jsonl(path, [warmup_record(p, rng) for p in problems])
