"""Config errors: every problem found, reported together, each naming its key and what would be valid."""

from __future__ import annotations

import difflib

from pydantic import BaseModel, ValidationError

from vlmtune.config.schema import GROUPS, Config, StageConfig


class ConfigError(ValueError):
    """Every problem found in a config, reported together."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys beside the last element of ``loc`` (for "did you mean")."""
    parent = loc[:-1]
    model: type[BaseModel] = Config
    for part in parent:
        if isinstance(part, int) or str(part).isdigit():  # an index into stages
            continue
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if model is Config and part == "stages":
            ann = StageConfig
        ann = next((a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _same_word(a: str, b: str) -> bool:
    """A typo or a shortening of the same word (len / length, sample / samples), not another word (audio / video)."""
    if a == b or (min(len(a), len(b)) >= 3 and (a.startswith(b) or b.startswith(a))):
        return True
    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.8


def _same_words(name: str, candidate: str) -> bool:
    """The same words, each maybe misspelled, in this order or another (save_model_only / save_only_model)."""
    mine, theirs = name.lower().split("_"), candidate.lower().split("_")
    if len(mine) != len(theirs):
        return False
    return all(map(_same_word, mine, theirs)) or all(map(_same_word, sorted(mine), sorted(theirs)))


def suggest(name: str, valid: list[str]) -> str:
    """' (did you mean X?)' for the valid name made of the same words as ``name`` (each maybe misspelled), or ''.
    A looser likeness would suggest keys of another meaning (audio_max_pixels -> video_max_pixels)."""
    close = [v for v in valid if _same_words(name, v)]
    close.sort(key=lambda v: -difflib.SequenceMatcher(None, name, v).ratio())
    return f" (did you mean '{close[0]}'?)" if close else ""


_TYPE_LABELS = {
    "str",
    "int",
    "float",
    "bool",
    "dict",
    "list",
    "tuple",
    "none",
    "literal",
    "DataSource",
}  # union members


def format_validation_error(err: ValidationError, extra_valid: list[str] | None = None) -> list[str]:
    """Turns pydantic's errors into one line each, naming the key and what would be valid."""
    problems: list[str] = []
    for e in err.errors():
        # pydantic puts the union member it tried into the location ("targets.list[str].0"); keep only keys and indexes.
        raw_loc = tuple(e["loc"])
        keep_last = e["type"] == "extra_forbidden" and raw_loc  # there the last part is the user's own key
        inner = raw_loc[:-1] if keep_last else raw_loc
        loc = tuple(p for p in inner if not (isinstance(p, str) and ("[" in p or p in _TYPE_LABELS)))
        loc += raw_loc[-1:] if keep_last else ()
        if not loc:
            problems.append(f"the top level: {e['msg']} (got {e.get('input')!r:.80})")
            continue
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden" and len(loc) >= 2 and loc[-2] == "groups":
            where = ".".join(str(p) for p in loc[:-1])
            problems.append(
                f"'{key}' is not a component group{suggest(str(loc[-1]), list(GROUPS))}; "
                f"{where} are {', '.join(GROUPS)}"
            )
        elif e["type"] == "extra_forbidden":
            valid = _fields_at(loc) + (extra_valid or [] if len(loc) == 1 else [])
            problems.append(
                f"unknown key '{key}'{suggest(str(loc[-1]), valid)}; valid here: {', '.join(_fields_at(loc))}"
            )
        else:
            msg = e["msg"].removeprefix("Value error, ")  # vlmtune's own checks speak for themselves
            line = f"'{key}': {msg} (got {e.get('input')!r})"
            same_key = [i for i, p in enumerate(problems) if p.startswith(f"'{key}': ")]
            if same_key:  # one line per key: a union reports each member's complaint
                problems[same_key[0]] = problems[same_key[0]].replace(" (got", f", or {msg} (got", 1)
            else:
                problems.append(line)
    return problems
