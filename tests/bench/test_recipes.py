"""The recipe study's data and summary (the study itself is a benchmark: `python -m vlmtune.bench.recipes`)."""

from __future__ import annotations

import json

from PIL import Image

from vlmtune.bench.recipes import BASE_LEVEL, VARIANTS, write_brief
from vlmtune.bench.recipes_report import report


def test_brief_task_is_seeded_and_answers_from_its_own_image(tmp_path):
    from vlmtune.data.shapes import COLORS, POSITIONS, SHAPES

    train, eval_ = write_brief(tmp_path / "a", train=6, eval_=4)
    again, _ = write_brief(tmp_path / "b", train=6, eval_=4)
    assert train.read_bytes() == again.read_bytes()
    for line in train.read_text().splitlines():
        record = json.loads(line)
        answer = record["messages"][1]["content"]
        colour_shape, position = answer.split(", ")
        colour, shape = colour_shape.split(" ")
        assert colour in COLORS and shape in SHAPES and position in POSITIONS
        image = Image.open(train.parent / record["images"][0]).convert("RGB")
        assert COLORS[colour] in [c for _, c in image.getcolors(64 * 64)]
    assert len(eval_.read_text().splitlines()) == 4


def test_every_factor_has_its_baseline_level_and_the_report_gives_mean_and_spread():
    assert {f for f, _, _ in VARIANTS} - {"baseline"} == set(BASE_LEVEL)
    runs = [
        [{"step": 0, "eval_loss": 3.0, "eval/exact_match": 0.0, "eval/ablation_gap_other": 0.1},
         {"step": 120, "eval_loss": 0.5, "eval/exact_match": em, "eval/ablation_gap_other": 1.0, "seconds": 30.0}]
        for em in (0.5, 0.7, 0.9)
    ]  # fmt: skip
    text = report({"color": {("baseline", "quickstart"): runs}}, BASE_LEVEL, 3, "tiny-qwen2-vl-v5")
    assert "Fine-tuned from the builtin base `tiny-qwen2-vl-v5`." in text
    assert "| baseline | quickstart | 0.700 ± 0.200 | 0.500 ± 0.000 | 1.000 ± 0.000 | 0.000 |" in text


def test_an_unknown_task_or_factor_is_named_before_anything_runs(tmp_path, capsys):
    import pytest

    from vlmtune.bench.recipes import main

    with pytest.raises(SystemExit) as exc:
        main(["--tasks", "color,colour", "--only", "rank (alpha 2r),ranks", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "task 'colour'" in err and "factor 'ranks'" in err and "tasks are color, brief" in err
    assert not any(tmp_path.iterdir())  # nothing built or run
