"""A sweep's search space: a YAML file mapping config keys to what each may take, checked against the config.

```yaml
groups.projector.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
groups.language_model.rank: {type: int, low: 4, high: 32, step: 4}
train.scheduler: {type: categorical, choices: [cosine, linear]}
```

Every key is a ``key.path`` as ``vlmtune train CONFIG key.path=value`` takes it; every bound and choice is
applied to the config through the same loader (``config/load.py``), so a key the config does not have or a value
it refuses is named before any trial runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlmtune.config.errors import ConfigError
from vlmtune.config.load import load_config
from vlmtune.config.overrides import read_yaml

KINDS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}
"""Each kind of parameter and the settings it takes (Optuna's ``suggest_float``, ``suggest_int``,
``suggest_categorical``)."""


@dataclass(frozen=True)
class Param:
    """One config key of the space and the values it may take."""

    key: str
    kind: str  # float, int or categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        """The trial's value for this key (Optuna samples it, or returns the enqueued one)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.key, list(self.choices))

    def edges(self) -> list:
        """The values checked against the config: both bounds, or every choice."""
        if self.kind == "categorical":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]


def override(key: str, value: Any) -> str:
    """``key=value`` with the value written as YAML reads it back (``1e-05`` alone would read as a string)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def _number(value: Any) -> float | None:
    """A bound as a number: YAML reads ``1e-5`` (no dot) as a string, so strings that are numbers count."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _param(key: str, spec: Any) -> tuple[Param | None, list[str]]:
    """One entry of the space file, or what is wrong with it."""
    where = f"'{key}'"
    if not isinstance(spec, dict):
        return None, [f"{where}: expected a mapping such as {{type: float, low: 1.0e-5, high: 1.0e-2, log: true}}"]
    kind = spec.get("type")
    if kind not in KINDS:
        return None, [f"{where}: type {kind!r} is not one of {', '.join(KINDS)}"]
    unknown = sorted(set(spec) - KINDS[kind])
    if unknown:
        return None, [
            f"{where}: unknown setting(s) {', '.join(unknown)} for type {kind}; valid: {', '.join(sorted(KINDS[kind]))}"
        ]
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            return None, [f"{where}: choices must be a non-empty list of values"]
        if any(c is not None and not isinstance(c, (bool, int, float, str)) for c in choices):
            return None, [f"{where}: each choice must be a number, a string, true/false or null"]
        return Param(key, kind, choices=tuple(choices)), []
    low, high = _number(spec.get("low")), _number(spec.get("high"))
    problems = []
    if low is None or high is None:
        problems.append(f"{where}: low and high must both be numbers (got {spec.get('low')!r}, {spec.get('high')!r})")
    elif not low < high:
        problems.append(f"{where}: low ({spec['low']}) must be below high ({spec['high']})")
    elif kind == "int" and (low != int(low) or high != int(high)):
        problems.append(f"{where}: an int range needs whole bounds (got {spec['low']}, {spec['high']})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        problems.append(f"{where}: log must be true or false (got {log!r})")
    elif log and low is not None and low <= 0:
        problems.append(f"{where}: a log range needs low > 0 (got {spec['low']})")
    step = _number(spec["step"]) if "step" in spec else None
    if "step" in spec and (step is None or step <= 0 or not math.isfinite(step)):
        problems.append(f"{where}: step must be a positive number (got {spec['step']!r})")
    elif step is not None and log:
        problems.append(f"{where}: step and log: true cannot be combined (Optuna samples one or the other)")
    if problems:
        return None, problems
    return Param(key, kind, low, high, log, step), []


def read_space(path: str | Path, config: str | Path, overrides: list[str] | None = None) -> list[Param]:
    """Reads and checks a space file against a config: each entry's form, then its bounds (or every choice)
    applied to the config and validated as ``vlmtune train`` would.

    Raises:
        ConfigError: every problem, each naming the key and what would be valid.
    """
    raw = read_yaml(path)
    if not raw:
        raise ConfigError([f"{path}: no parameters; give at least one key such as groups.projector.lr"], str(path))
    params, problems = [], []
    for key, spec in raw.items():
        param, wrong = _param(str(key), spec)
        problems += wrong
        if param is None:
            continue
        params.append(param)
        for value in param.edges():
            try:
                load_config(config, [*(overrides or []), override(param.key, value)], echo=lambda *a: None)
            except ConfigError as e:
                problems += [f"'{param.key}' = {value!r}: {p}" for p in e.problems]
                break  # one value shows what is wrong with the key
    if problems:
        raise ConfigError(problems, f"search space {path}")
    return params


def space_overrides(params: list[Param], values: dict) -> list[str]:
    """A trial's values as ``key=value`` overrides, in the space's order."""
    return [override(p.key, values[p.key]) for p in params]
