"""Property tests: whatever JSON a data file holds and whatever YAML a config holds, the readers raise nothing but
vlmtune's own errors (each naming the place); no input ends in a Python traceback."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmtune.config.errors import ConfigError
from vlmtune.config.load import load_config
from vlmtune.data.sharegpt import Format, Problem, Sample, parse_record, read_file

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
TURN = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool"]) | JSON,
        "from": st.sampled_from(["human", "gpt"]) | JSON,
        "content": st.text(max_size=20).map(lambda s: s.replace("x", "<image>")) | JSON,
        "value": st.text(max_size=20) | JSON,
    },
)
RECORD = (
    st.fixed_dictionaries(
        {},
        optional={
            "messages": st.lists(TURN | JSON, max_size=5) | JSON,
            "conversations": st.lists(TURN | JSON, max_size=5) | JSON,
            "images": st.lists(st.text(max_size=10) | JSON, max_size=3) | st.text(max_size=10) | JSON,
            "system": JSON,
        },
    )
    | JSON
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(RECORD)
def test_any_record_is_a_sample_or_named_problems(record):
    sample, problems = parse_record(record, "data.jsonl:1", Path("/nonexistent-base"), Format())
    if sample is None:
        assert problems and all(isinstance(p, Problem) and p.where == "data.jsonl:1" for p in problems)
    else:
        assert isinstance(sample, Sample) and problems == []


@FAST
@given(st.lists(RECORD | st.text(max_size=30), min_size=0, max_size=5))
def test_any_jsonl_file_reads_as_samples_and_problems_in_order(lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
        path.write_text(text, encoding="utf-8")
        got = list(read_file(path))
    assert got and all(isinstance(g, (Sample, Problem)) for g in got)


SECTIONS = {
    "model": ["path", "dtype", "arch", "arch_entry", "attn_implementation", "trust_remote_code"],
    "groups": ["vision_tower", "projector", "language_model", "lm_head", "projecter"],
    "data": ["train", "eval", "max_length", "too_long", "num_workers", "augment", "image_max_pixels"],
    "train": ["max_steps", "batch_size", "learning_rate", "packing", "packing_length", "adam_betas", "report_to"],
    "eval": ["samples", "retrieval_k"],
    "stages": [],
    "lora_target": [],
    "cutoff_len": [],
    "finetuning_type": [],
}
CONFIG = st.dictionaries(
    st.sampled_from(sorted(SECTIONS)) | st.text(max_size=8),
    st.dictionaries(st.sampled_from(sorted({k for v in SECTIONS.values() for k in v})) | st.text(max_size=6), JSON)
    | st.lists(st.dictionaries(st.sampled_from(["name", "steps", "groups", "data"]), JSON), max_size=3)
    | JSON,
    max_size=5,
)


@FAST
@given(CONFIG)
def test_any_yaml_config_loads_or_raises_a_config_error(raw):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        try:
            load_config(path, echo=lambda line: None)
        except ConfigError as e:
            assert e.problems and all(isinstance(p, str) and p for p in e.problems)
