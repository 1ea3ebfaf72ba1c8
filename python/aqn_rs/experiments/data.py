"""Training and validation data: GSM8K-format jsonl, or the built-in arithmetic task.

Records are `{"question": str, "answer": str}` with the answer ending in `#### <number>`
(GSM8K's format). `--data PATH` takes a folder with `train.jsonl` and `test.jsonl` (GSM8K's
layout) or one jsonl file (then the last 10% of its lines, at most `eval_size`, validate).

Without `--data`, the built-in generator makes easy arithmetic word problems with a fixed
train/test split. Its difficulty sits between the two tasks measured on SmolLM2-135M
(docs/guides/EXPERIMENTS.md, "The embedded default and its settings"): single-step
add/subtract problems saturate (0% -> 100% strict in 100 GRPO steps), a two-step task with
two-digit numbers stayed at 0%. The built-in task mixes three levels so the baseline
has something to learn quickly (level 1) and something it cannot finish learning in a short
run (levels 2-3), i.e. it rises from ~0 and ends well below saturation:

* level 1 (40%): one addition or subtraction, numbers 2..50;
* level 2 (30%): one multiplication (2..9 x 2..12) or the matching exact division;
* level 3 (30%): two steps with one-digit numbers (a + b - c, a * b + c).

The split is fixed: a problem is a test problem iff the SHA-1 of its question text falls in
the first tenth, so train and test never share a question, whatever sizes are asked for.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import ExperimentError
from .reward import GSM8K_SUFFIX, ground_truth

# The system prompt: the answer format and one worked example (measured: without an example
# SmolLM2-135M writes `#### n` ~1% of the time, so a strict reward has nothing to learn from).
SYSTEM_PROMPT = (
    "You are a careful math tutor. Solve the problem in one or two short sentences, then write "
    "the final answer as a plain number after \"####\".\n\n"
    "Example:\n"
    "Question: Tom has 3 apples and buys 4 more. How many apples does Tom have now?\n"
    "Answer: Tom has 3 + 4 = 7 apples.\n"
    "#### 7"
)

BUILTIN = "builtin"  # `--data builtin`: this task by name (the verl engine's default is the Hub's GSM8K)
BUILTIN_SEED = 20251126
BUILTIN_MIX = (("add_sub", 0.4), ("mul_div", 0.3), ("two_step", 0.3))

_NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Kira",
          "Leo", "Mia", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will")
_ITEMS = ("apples", "pencils", "marbles", "stickers", "cookies", "books", "shells", "cards",
          "stamps", "balloons", "coins", "flowers")
_BOXES = ("boxes", "bags", "packs", "jars", "baskets", "crates")


def _level1(r: random.Random) -> Tuple[str, str, int]:
    n, it = r.choice(_NAMES), r.choice(_ITEMS)
    a, b = r.randint(2, 50), r.randint(2, 50)
    if r.random() < 0.5:
        q = f"{n} has {a} {it} and gets {b} more. How many {it} does {n} have now?"
        return q, f"{n} has {a} + {b} = {a + b} {it}.", a + b
    a, b = max(a, b), min(a, b)
    if a == b:
        a += r.randint(1, 9)
    q = f"{n} has {a} {it} and gives {b} of them away. How many {it} does {n} have left?"
    return q, f"{n} has {a} - {b} = {a - b} {it} left.", a - b


def _level2(r: random.Random) -> Tuple[str, str, int]:
    n, it, box = r.choice(_NAMES), r.choice(_ITEMS), r.choice(_BOXES)
    a, b = r.randint(2, 9), r.randint(2, 12)
    if r.random() < 0.6:
        q = f"{n} buys {a} {box} of {it}. Each of the {box} holds {b} {it}. How many {it} does {n} buy?"
        return q, f"{n} buys {a} * {b} = {a * b} {it}.", a * b
    q = f"{n} shares {a * b} {it} equally among {a} friends. How many {it} does each friend get?"
    return q, f"Each friend gets {a * b} / {a} = {b} {it}.", b


def _level3(r: random.Random) -> Tuple[str, str, int]:
    n, it, box = r.choice(_NAMES), r.choice(_ITEMS), r.choice(_BOXES)
    if r.random() < 0.5:
        a, b = r.randint(1, 9), r.randint(1, 9)
        c = r.randint(1, a + b - 1) if a + b > 1 else 0
        q = f"{n} has {a} {it}, finds {b} more and then gives {c} to a friend. How many {it} does {n} have now?"
        return q, f"{n} has {a} + {b} = {a + b} {it}, then {a + b} - {c} = {a + b - c}.", a + b - c
    a, b, c = r.randint(2, 6), r.randint(2, 6), r.randint(1, 9)
    q = f"{n} has {a} {box} with {b} {it} in each, and {c} more {it} on the table. How many {it} does {n} have in all?"
    return q, f"{n} has {a} * {b} = {a * b} {it} in {box}, then {a * b} + {c} = {a * b + c}.", a * b + c


_LEVELS = {"add_sub": (1, _level1), "mul_div": (2, _level2), "two_step": (3, _level3)}


def is_test_question(question: str) -> bool:
    """The fixed split: SHA-1 of the question text, first byte < 26 (~10%) -> test."""
    return hashlib.sha1(question.encode()).digest()[0] < 26


def builtin_problems(split: str, n: int, mix: Sequence[Tuple[str, float]] = BUILTIN_MIX,
                     seed: int = BUILTIN_SEED) -> List[Dict[str, Any]]:
    """`n` distinct problems of the built-in task from one side of the fixed split.

    Args:
        split: "train" or "test".
        n: how many (the same `n` and `mix` always give the same list).
        mix: (level name, weight) pairs; names: add_sub, mul_div, two_step.
        seed: generator seed (fixed by default; the split does not depend on it).

    Returns:
        GSM8K-format records with an extra "level" (1-3).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    names = [m for m, _ in mix]
    for m in names:
        if m not in _LEVELS:
            raise ExperimentError(f"unknown built-in level {m!r}; expected one of {sorted(_LEVELS)}")
    weights = [float(w) for _, w in mix]
    r = random.Random(f"{seed}-{split}")
    out: List[Dict[str, Any]] = []
    seen = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10000:
            raise ExperimentError(f"the built-in generator ran out of distinct {split} problems at {len(out)} of {n}")
        level_name = r.choices(names, weights)[0]
        level, make = _LEVELS[level_name]
        q, work, ans = make(r)
        if q in seen or is_test_question(q) != (split == "test"):
            continue
        seen.add(q)
        out.append({"question": q, "answer": f"{work}\n#### {ans}", "level": level})
    return out


def read_jsonl(path: pathlib.Path) -> List[Dict[str, Any]]:
    """GSM8K-format records of a jsonl file; ExperimentError naming the file and line if not."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ExperimentError(f"cannot read data file {path}: {e.strerror or e}") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ExperimentError(f"data file {path} line {i} is not JSON: {e.msg}") from None
        if not isinstance(rec, dict) or "question" not in rec or "answer" not in rec:
            raise ExperimentError(f"data file {path} line {i} needs 'question' and 'answer' (GSM8K format)")
        try:
            ground_truth(str(rec["answer"]))
        except ValueError:
            raise ExperimentError(f"data file {path} line {i}: the answer has no '#### <number>'") from None
        out.append(rec)
    if not out:
        raise ExperimentError(f"data file {path} has no records")
    return out


def parse_mix(mix: Any) -> Tuple[Tuple[str, float], ...]:
    """A level mix from a mapping {add_sub: w, mul_div: w, two_step: w} (None: the default)."""
    if mix is None:
        return BUILTIN_MIX
    if not isinstance(mix, dict) or not mix:
        raise ExperimentError(f"data.builtin_mix must be a mapping of level -> weight, got {mix!r}")
    out = []
    for k, w in mix.items():
        if k not in _LEVELS:
            raise ExperimentError(f"data.builtin_mix: unknown level {k!r}; expected {sorted(_LEVELS)}")
        if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
            raise ExperimentError(f"data.builtin_mix.{k} must be a weight >= 0, got {w!r}")
        if w > 0:
            out.append((k, float(w)))
    if not out:
        raise ExperimentError("data.builtin_mix gives every level weight 0")
    return tuple(out)


def load_data(path: Optional[str], train_size: Optional[int] = None, eval_size: int = 200, mix: Any = None
              ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]], str]:
    """(train records, validation records, description) for `--data PATH` or the built-in task.

    Args:
        path: a folder with train.jsonl and test.jsonl, one jsonl file, or None / "builtin" (built-in).
        train_size: built-in task: how many training problems (default 5000).
        eval_size: at most this many validation problems (the first ones of the test split).
        mix: built-in task: {level: weight} (preset key `data.builtin_mix`; None: 40/30/30).
    """
    if path is None or path == BUILTIN:
        m = parse_mix(mix)
        train = builtin_problems("train", train_size or 5000, m)
        test = builtin_problems("test", eval_size, m)
        total = sum(w for _, w in m)
        levels = ", ".join(f"{k} {100 * w / total:.0f}%" for k, w in m)
        return train, test, f"builtin arithmetic word problems (levels {levels})"
    return read_gsm8k(path, eval_size)


def read_gsm8k(path: str, eval_size: Optional[int] = None
               ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]], str]:
    """(train, validation, description) of GSM8K-format data: a folder with train.jsonl and
    test.jsonl, or one jsonl file whose last tenth validates. `eval_size` caps the validation
    records (the first of test.jsonl, or at most that many of a file's last tenth); None keeps
    every one (the verl engine validates on the whole split)."""
    p = pathlib.Path(path)
    if p.is_dir():
        tr, te = p / "train.jsonl", p / "test.jsonl"
        if not tr.is_file() or not te.is_file():
            raise ExperimentError(f"data folder {p} needs train.jsonl and test.jsonl (GSM8K layout)")
        train, test = read_jsonl(tr), read_jsonl(te)
        if eval_size is None:
            return train, test, f"{p} (train.jsonl {len(train)}, test.jsonl {len(test)})"
        return train, test[:eval_size], f"{p} (train.jsonl {len(train)}, test.jsonl first {min(eval_size, len(test))})"
    if not p.exists():
        raise ExperimentError(f"data path {p} does not exist")
    recs = read_jsonl(p)
    tenth = len(recs) // 10
    n_eval = max(1, tenth if eval_size is None else min(eval_size, tenth))
    if len(recs) - n_eval < 1:
        raise ExperimentError(f"data file {p} has too few records ({len(recs)}) to split into train and validation")
    return recs[:-n_eval], recs[-n_eval:], f"{p} ({len(recs) - n_eval} train, last {n_eval} validate)"


def prompt_messages(question: str, system_prompt: str = SYSTEM_PROMPT) -> List[Dict[str, str]]:
    """The chat prompt of one problem: system (format + one example), user (question + verl's suffix)."""
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": f"{question} {GSM8K_SUFFIX}"},
    ]


def to_prompt_records(records: Sequence[Dict[str, Any]], system_prompt: str = SYSTEM_PROMPT) -> List[Dict[str, Any]]:
    """TRL's conversational dataset rows: {"prompt": messages, "answer": ground truth}."""
    return [{"prompt": prompt_messages(str(r["question"]), system_prompt), "answer": ground_truth(str(r["answer"])),
             "level": int(r.get("level", 0))} for r in records]
