"""GSM8K reward, exactly as verl scores it (`verl/utils/reward_score/gsm8k.py`, verl 0.9.1).

strict: the last `#### <number>` in the last 300 characters, commas and `$` stripped, must
equal the ground truth string. flexible: the last number-like token in the last 300
characters (commas kept, as verl does). The reward is `correct` for a match, `format` when an
answer was extracted but is wrong (verl's `format_score`), 0 when none was found.
tests/e2e/test_experiments.py checks these functions against verl's own file.
"""

from __future__ import annotations

import re
from typing import Any, List, Optional, Sequence

SOLUTION_CLIP_CHARS = 300  # verl: "a safe approximation for 300 tokens"
_STRICT = re.compile("#### (\\-?[0-9\\.\\,]+)")
_FLEXIBLE = re.compile("(\\-?[0-9\\.\\,]+)")
_INVALID = ("", ".")

# verl's data preprocessing (examples/data_preprocess/gsm8k.py) appends this to each question.
GSM8K_SUFFIX = 'Let\'s think step by step and output the final answer after "####".'


def extract_solution(text: str, method: str = "strict") -> Optional[str]:
    """The answer string verl extracts from a completion, or None.

    Args:
        text: the completion.
        method: "strict" (needs `#### n`) or "flexible" (the last number).
    """
    if method not in ("strict", "flexible"):
        raise ValueError(f"method must be 'strict' or 'flexible', got {method!r}")
    if len(text) > SOLUTION_CLIP_CHARS:
        text = text[-SOLUTION_CLIP_CHARS:]
    if method == "strict":
        found = _STRICT.findall(text)
        if not found:
            return None
        return found[-1].replace(",", "").replace("$", "")
    answer = None
    for answer in reversed(_FLEXIBLE.findall(text)):
        if answer not in _INVALID:
            break
    return answer


def compute_score(text: str, ground_truth: str, method: str = "strict", format_score: float = 0.0,
                  score: float = 1.0) -> float:
    """verl's `compute_score`: `score` if the extracted answer equals `ground_truth`, else
    `format_score` if one was extracted, else 0."""
    answer = extract_solution(text, method)
    if answer is None:
        return 0
    return score if answer == ground_truth else format_score


def ground_truth(answer_field: str) -> str:
    """The label from a GSM8K `answer` field, as verl's preprocessing extracts it."""
    m = _STRICT.search(answer_field)
    if m is None:
        raise ValueError(f"no '#### <number>' in answer {answer_field[-80:]!r}")
    return m.group(0).split("#### ")[1].replace(",", "")


def completion_text(completion: Any) -> str:
    """Text of a TRL completion: a string, or a conversational list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in completion)
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return str(completion)


class Gsm8kReward:
    """A TRL reward function: `reward(completions=..., answer=[...]) -> [float]`.

    Args:
        correct: reward of a correct strict answer (verl: 1.0).
        format: reward of a strict answer that is wrong (verl's `format_score`).
    """

    def __init__(self, correct: float = 1.0, format: float = 0.0) -> None:
        self.correct = float(correct)
        self.format = float(format)
        self.__name__ = "gsm8k_strict"  # TRL names the reward metric after the function

    def __call__(self, completions: Sequence[Any], answer: Sequence[str], **_: Any) -> List[float]:
        return [float(compute_score(completion_text(c), str(a), "strict", self.format, self.correct))
                for c, a in zip(completions, answer)]
