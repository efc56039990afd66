"""GRPO rewards: built-in scorers, regex matches and the user's own functions, summed with weights.

Written by hand: no library scores completions the way our configs name them.

Every reward function is called with keyword arguments ``prompts``, ``completions``, ``references`` and
``metadata`` (lists of one length, one entry per completion) and returns one float per completion.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlmtune.config.errors import ConfigError
from vlmtune.eval.evaluate import normalize

KEY = "train.grpo.rewards"
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# the DeepSeek-R1 output format (DeepSeek-AI 2025, arXiv 2501.12948): reasoning in <think>, then the answer
FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


@dataclass
class RewardFn:
    """A reward function with the name it is logged under and its weight in the total."""

    label: str
    weight: float
    fn: Callable[..., list[float]]

    def __call__(
        self, prompts: list[str], completions: list[str], references: list[str], metadata: list[dict]
    ) -> list[float]:
        return self.fn(prompts=prompts, completions=completions, references=references, metadata=metadata)


def extract_answer(completion: str) -> str:
    """The text inside the last ``<answer>...</answer>`` pair, or the whole completion when there is none.

    The last pair, because a model that drafts an answer while reasoning writes its final one at the end.
    """
    found = ANSWER.findall(completion)
    return found[-1] if found else completion


def exact_match(*, completions: list[str], references: list[str], **_) -> list[float]:
    """1.0 where the answer's normal form (trimmed, whitespace collapsed, case-folded) equals the reference's."""
    return [float(normalize(extract_answer(c)) == normalize(r)) for c, r in zip(completions, references)]


def contains(*, completions: list[str], references: list[str], **_) -> list[float]:
    """1.0 where the reference's normal form occurs in the answer's."""
    return [float(normalize(r) in normalize(extract_answer(c))) for c, r in zip(completions, references)]


def format_reward(*, completions: list[str], **_) -> list[float]:
    """1.0 where the completion is ``<think>...</think>`` then ``<answer>...</answer>`` and nothing else."""
    return [float(FORMAT.match(c) is not None) for c in completions]


def length_penalty(*, completions: list[str], references: list[str], **_) -> list[float]:
    """0 up to the reference's length, then down to -1 as the completion grows to twice it (plus one).

    Lengths are whitespace-separated words (tokens are not known here) of the whole completion:
    ``-min(1, max(0, words(c) - words(r)) / (words(r) + 1))``. Never positive, never below -1, and never
    rising with the completion's length.
    """
    out = []
    for c, r in zip(completions, references):
        words, ref_words = len(c.split()), len(r.split())
        out.append(0.0 - min(1.0, max(0, words - ref_words) / (ref_words + 1)))  # 0.0 - x: no -0.0
    return out


BUILTINS: dict[str, Callable[..., list[float]]] = {
    "exact_match": exact_match,
    "contains": contains,
    "format": format_reward,
    "length_penalty": length_penalty,
}


def builtin_reward(name: str) -> Callable[..., list[float]]:
    """The built-in reward function called ``name``."""
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in reward {name!r}; valid: {', '.join(BUILTINS)}")
    return BUILTINS[name]


def regex_reward(pattern: str) -> Callable[..., list[float]]:
    """1.0 where ``re.search(pattern, completion)`` finds a match, else 0.0; the pattern is compiled once."""
    compiled = re.compile(pattern)

    def reward(*, completions: list[str], **_) -> list[float]:
        return [float(compiled.search(c) is not None) for c in completions]

    return reward


def import_reward(path: str, key: str = f"{KEY}[0].function") -> Callable[..., list[float]]:
    """The user's function named by ``"package.module:function"``, imported because their config names it.

    Raises:
        ConfigError: (a ValueError) naming ``key`` and why: a malformed path, a module that cannot be
            imported, a missing attribute, or one that is not callable.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError([f"{key}: {path!r} is not 'package.module:function'"])
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # the user's module may fail in any way while it is imported
        raise ConfigError([f"{key}: cannot import module {module_name!r}: {type(e).__name__}: {e}"]) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError([f"{key}: module {module_name!r} has no attribute {attr!r}"])
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError([f"{key}: {path!r} is a {type(obj).__name__}, not a function"])
    return obj


def build_rewards(specs) -> list[RewardFn]:
    """Reward functions from config entries, each with exactly one of ``name``, ``regex`` or ``function``.

    Each spec is any object with the attributes ``name``, ``regex``, ``function``, ``weight`` and ``label``
    (missing ones count as None). The label defaults to the built-in's name, ``regex``, or the function's
    name, with ``_i`` (the entry's index) added when an earlier entry has it already; labels set in the spec
    must differ, because each is logged under its own. Every problem is collected, then raised once.

    Raises:
        ConfigError: (a ValueError) with each problem naming ``train.grpo.rewards[i]`` or a key inside it.
    """
    fns: list[RewardFn] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        at = f"{KEY}[{i}]"
        name, pattern, function = (getattr(spec, k, None) for k in ("name", "regex", "function"))
        given = [k for k, v in (("name", name), ("regex", pattern), ("function", function)) if v is not None]
        if len(given) != 1:
            problems.append(f"{at}: set exactly one of name, regex, function (set: {', '.join(given) or 'none'})")
            continue
        try:
            if name is not None:
                fn, label = builtin_reward(name), name
            elif pattern is not None:
                fn, label = regex_reward(pattern), "regex"
            else:
                fn, label = import_reward(function, f"{at}.function"), function.partition(":")[2]
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        except re.error as e:
            problems.append(f"{at}.regex: {pattern!r} is not a valid regular expression: {e}")
            continue
        except ValueError as e:
            problems.append(f"{at}.name: {e}")
            continue
        explicit = getattr(spec, "label", None)
        if explicit:
            label = explicit
        elif label in seen:  # a second regex, or the same builtin twice: the entry's index tells them apart
            label = f"{label}_{i}"
        weight = getattr(spec, "weight", None)
        weight = 1.0 if weight is None else float(weight)
        if label in seen:
            problems.append(f"{at}.label: {label!r} is already the label of {KEY}[{seen[label]}]; set another")
            continue
        seen[label] = i
        fns.append(RewardFn(label=label, weight=weight, fn=fn))
    if problems:
        raise ConfigError(problems)
    return fns


def _checked(fn: RewardFn, values, n: int) -> list[float]:
    """``values`` as floats, or a ValueError naming the function's label and what it returned."""
    shown = repr(values)
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not hasattr(values, "__iter__"):
        raise ValueError(f"reward {fn.label!r} returned {shown}; expected a list of {n} floats")
    values = list(values)
    if len(values) != n:
        raise ValueError(f"reward {fn.label!r} returned {len(values)} values for {n} completions: {shown}")
    for j, v in enumerate(values):
        if not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"reward {fn.label!r} returned {v!r} at index {j}; expected a finite number: {shown}")
    return [float(v) for v in values]


def score(
    fns: list[RewardFn],
    prompts: list[str],
    completions: list[str],
    references: list[str],
    metadata: list[dict],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every reward function on every completion.

    Returns:
        The total ``sum_i weight_i * r_i`` (N,) float32, and each function's raw (unweighted) values (N,)
        by label.

    Raises:
        ValueError: Inputs of different lengths, or a function returning the wrong number of values or
            something that is not a finite number (the message names its label and what it returned).
    """
    n = len(completions)
    lengths = {"prompts": len(prompts), "references": len(references), "metadata": len(metadata)}
    if any(v != n for v in lengths.values()):
        raise ValueError(f"{n} completions but {', '.join(f'{v} {k}' for k, v in lengths.items())}")
    total = torch.zeros(n, dtype=torch.float32)
    each: dict[str, torch.Tensor] = {}
    for fn in fns:
        values = _checked(fn, fn(prompts, completions, references, metadata), n)
        each[fn.label] = torch.tensor(values, dtype=torch.float32)
        total = total + fn.weight * each[fn.label]
    return total, each
