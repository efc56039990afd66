"""The run report's gallery: the first eval samples of a run (thumbnail, question, reference) with the answers
the model generated before training and after each stage, kept in the run folder's ``gallery.jsonl``.

The answers are the ones the evaluation generated for its metrics where it did (``eval.generate_in_training``);
otherwise only the gallery's few samples are generated, greedily as ``vlmtune eval`` does.
"""

from __future__ import annotations

import base64
import json
from io import BytesIO
from pathlib import Path

from PIL import Image

from vlmtune.config.schema import EvalConfig
from vlmtune.data.sharegpt import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Sample
from vlmtune.eval.alignment import EvalItem
from vlmtune.eval.generate import GenerationSettings, generate, item_prompt, prompt_messages
from vlmtune.paths import write_atomic

GALLERY_SAMPLES = 8
"""How many eval samples (the first ones) the gallery shows."""
THUMBNAIL_PX = 96
"""The longer side of a gallery thumbnail, in pixels."""


def thumbnail(image: Image.Image, size: int = THUMBNAIL_PX) -> str:
    """``image`` shrunk to fit ``size`` x ``size`` pixels (aspect kept), as a PNG data URI."""
    small = image.convert("RGB")
    small.thumbnail((size, size))
    buf = BytesIO()
    small.save(buf, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def question(sample: Sample) -> str:
    """The last user turn before the answer, without its image and video placeholders."""
    users = [content for role, content in prompt_messages(sample) if role == "user"]
    text = users[-1] if users else ""
    return " ".join(text.replace(IMAGE_PLACEHOLDER, " ").replace(VIDEO_PLACEHOLDER, " ").split())


def gallery_answers(model, processor, items: list[EvalItem], predictions: list[str], cfg: EvalConfig) -> list[str]:
    """The answers of ``items`` (the first eval samples): the evaluation's ``predictions`` where it generated them,
    else generated now for these items only. ``model`` is an unwrapped model; its mode is restored."""
    if len(predictions) >= len(items):
        return predictions[: len(items)]
    was_training = model.training
    model.eval()
    try:
        prompts = [item_prompt(processor, it) for it in items]
        return generate(
            model, processor, prompts, GenerationSettings(max_new_tokens=cfg.max_new_tokens), cfg.batch_size
        )
    finally:
        model.train(was_training)


def _row(item: EvalItem) -> dict:
    return {
        "where": item.sample.where,
        "images": [str(p) for p in item.sample.images],
        "thumbnails": [thumbnail(image) for image in item.images],
        "question": question(item.sample),
        "reference": item.answer,
        "before": None,
        "after": {},
    }


def update_gallery(path: Path, items: list[EvalItem], answers: list[str], stage: str | None) -> Path:
    """Records ``answers`` (one per item) in the gallery file: as the answers before training (``stage`` None,
    which starts the file afresh) or after the stage named ``stage``. Written atomically."""
    rows = read_gallery(path) if stage is not None else []
    if [r.get("where") for r in rows] != [it.sample.where for it in items]:
        rows = [_row(it) for it in items]  # a fresh run, or a file of other samples: start again
    for row, answer in zip(rows, answers):
        if stage is None:
            row["before"] = answer
        else:
            row["after"][stage] = answer
    return write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_gallery(path: Path) -> list[dict]:
    """The gallery file's rows; none when there is no file."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
