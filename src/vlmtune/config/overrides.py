"""Raw config dicts: reading YAML, merging, and ``a.b=c`` overrides from the command line."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from vlmtune.config.errors import ConfigError


def deep_merge(base: dict, update: dict) -> dict:
    """Returns ``base`` with ``update`` merged in (nested dicts merged, anything else replaced)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], parsed c); the value is read as YAML so numbers and lists work."""
    if "=" not in text:
        raise ConfigError([f"override '{text}' is not of the form key.path=value"], "command line")
    key, _, raw = text.partition("=")
    if not key.strip():
        raise ConfigError([f"override '{text}' has an empty key"], "command line")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Sets each ``key.path=value`` on a copy of the raw config dict."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):  # stages.1.steps=5: an index into a list
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        [
                            f"override '{text}': '{'.'.join(path[:depth])}' has {len(node)} entries, "
                            f"'{part}' is not an index 0..{len(node) - 1}"
                        ],
                        "command line",
                    )
                part = int(part)
                if last:
                    node[part] = value
                elif not isinstance(node[part], (dict, list)):
                    node[part] = {}
            elif last:
                node[part] = value
            elif not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            if not last:
                node = node[part]
    return out


def read_yaml(path: str | Path) -> dict:
    """Reads a YAML mapping, with errors naming the file (and line, for syntax errors)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file '{p}' does not exist"], str(p))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError([f"{p}: not valid YAML: {e}"], str(p)) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: the top level must be a mapping of keys, found {type(data).__name__}"], str(p))
    return data
