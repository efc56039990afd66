"""Generation with videos: prompts carry the videos' pixels and M-RoPE types, ``predict`` records name the videos,
``chat`` attaches one with '/video PATH' (videos from tests/data/test_video.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.data.test_video import make_media
from vlmtune.config.data import DataConfig
from vlmtune.data.dataset import build_dataset


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return make_media(tmp_path_factory.mktemp("video"))


def test_generation_predict_and_chat_with_videos(tiny, media, tmp_path):
    from vlmtune.eval.alignment import encode, eval_items, score
    from vlmtune.eval.generate import GenerationSettings, chat, item_prompt, left_padded, predict

    model, processor = tiny
    model.eval()
    ds = build_dataset(str(media / "mixed.jsonl"), DataConfig(), processor, "eval")
    items = eval_items(ds)
    prompt = item_prompt(processor, items[0])
    assert prompt["video_grid_thw"].tolist() == [[2, 6, 8]] and "pixel_values_videos" in prompt
    tok = processor.tokenizer
    pad, image_id, video_id = (
        tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|image_pad|>", "<|video_pad|>")
    )
    padded = left_padded([prompt], pad, image_id, video_id)
    assert int((padded["mm_token_type_ids"] == 2).sum()) == 24 and int((padded["mm_token_type_ids"] == 1).sum()) == 16
    settings = GenerationSettings(max_new_tokens=2)
    records = predict(model, processor, items, tmp_path / "p.jsonl", settings, batch_size=4, progress=False)
    assert [r.get("videos") for r in records] == [[str(media / "clip.mp4")], None, None, [str(media / "frames")]]
    projector = model.model.visual.merger
    scores = score(model, processor, [encode(processor, it) for it in items], 4, projector)
    assert all(math.isfinite(s.logprob) for s in scores) and scores[1].pooled is not None  # the image-only sample
    lines = iter([f"/video {media / 'clip.webm'}", "Which side?", f"/video {media / 'corrupt.mp4'}"])

    def read(_prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    written: list[str] = []
    history = chat(model, processor, settings, read, written.append)
    assert history[0] == ("user", "<video>Which side?") and history[1][0] == "assistant"
    assert f"cannot use '{media / 'corrupt.mp4'}'" in written[-1] and "cannot be opened" in written[-1]
