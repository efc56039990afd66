"""Videos for the Qwen-VL families, on real files written here with PyAV: reading, sampling and decoding, the checks,
the video tokens against the processor's own, training, the vision cache, packing, generation and the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import write_jsonl
from vlmtune.config.data import DataConfig
from vlmtune.data.chat import to_chat
from vlmtune.data.counted import encode_text, video_token_counts
from vlmtune.data.dataset import VLMDataset, build_dataset, check_sample
from vlmtune.data.media import load_images, load_videos
from vlmtune.data.sharegpt import DuplicateFinder, Problem, Sample, read_file
from vlmtune.data.video import VideoInfo, read_video, sample_indices, video_info

ASSETS = Path(__file__).parents[1] / "assets"
RED = ASSETS / "red_square.png"


def red_frame(k: int, width: int = 64, height: int = 48) -> np.ndarray:
    """A grey frame with a red square whose left edge is at 4 + 8k: it moves right by 8 px a frame."""
    a = np.full((height, width, 3), 220, np.uint8)
    a[8:24, 4 + 8 * k : 20 + 8 * k] = (220, 40, 40)
    return a


def write_video(path: Path, codec: str = "libx264", frames: int = 6, fps: int = 3) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(red_frame(k), format="rgb24")))
        container.mux(stream.encode())
    return path


def red_centre(frame: torch.Tensor) -> float:
    """Mean column of the red pixels of a (3, H, W) frame."""
    r, g = frame[0].int(), frame[1].int()
    return float(torch.nonzero((r > 150) & (g < 120))[:, 1].float().mean())


def turns(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def make_media(d: Path) -> Path:
    """Writes into ``d``: clip.mp4, clip.webm, clip.avi, a frames folder, a corrupt mp4, and mixed.jsonl: a video +
    image sample, an image sample, a text-only sample and a video-only sample."""
    for suffix, codec in ((".mp4", "libx264"), (".webm", "libvpx"), (".avi", "mpeg4")):
        write_video(d / f"clip{suffix}", codec)
    (d / "frames").mkdir()
    for k in range(5):  # frame_1 .. frame_5 written out of name order; the notes are not a frame
        Image.fromarray(red_frame(k)).save(d / "frames" / f"frame_{k + 1}.png")
    (d / "frames" / "notes.txt").write_text("not a frame")
    Image.fromarray(red_frame(0)).save(d / "frames" / "frame_10.png")  # after frame_5 (numbers compare as numbers)
    (d / "corrupt.mp4").write_bytes((d / "clip.mp4").read_bytes()[:200])
    rows = [
        {"messages": turns("<image>Which shape, and <video>where does it go?", "right"), "images": [str(RED)]}
        | {"videos": ["clip.mp4"]},
        {"messages": turns("<image>What color is the shape?", "red"), "images": [str(RED)]},
        {"messages": turns("Say top.", "top")},
        {"messages": turns("<video>Which side does the shape move to?", "right"), "videos": ["frames"]},
    ]
    write_jsonl(d / "mixed.jsonl", rows)
    return d


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return make_media(tmp_path_factory.mktemp("video"))


@pytest.mark.parametrize(
    "why, info, fps, max_frames, expected",
    [
        ("2 s at 3 fps, sampled at 2 fps", VideoInfo(6, 3.0, 2.0, 48, 64), 2.0, 64, [0, 2, 3, 5]),
        ("3 frames' worth rounded down to 2", VideoInfo(30, 10.0, 3.0, 48, 64), 1.0, 64, [7, 22]),
        ("a single frame given twice", VideoInfo(1, 25.0, 0.04, 48, 64), 2.0, 64, [0, 0]),
        (
            "capped by video_max_frames",
            VideoInfo(300, 30.0, 10.0, 48, 64),
            2.0,
            8,
            [18, 56, 93, 131, 168, 206, 243, 281],
        ),
        ("an odd cap rounds down", VideoInfo(300, 30.0, 10.0, 48, 64), 2.0, 5, [37, 112, 187, 262]),
        ("a cap of 1 still gives 2", VideoInfo(300, 30.0, 10.0, 48, 64), 2.0, 1, [75, 225]),
        ("a folder as it is, last frame repeated", VideoInfo(3, 2.0, 1.5, 48, 64, folder=True), 2.0, 64, [0, 1, 2, 2]),
        ("a folder over the cap, evenly", VideoInfo(10, 2.0, 5.0, 48, 64, folder=True), 2.0, 4, [1, 3, 6, 8]),
    ],
)
def test_frame_sampling(why, info, fps, max_frames, expected):
    assert sample_indices(info, fps, max_frames) == expected, why


@pytest.mark.parametrize("name", ["clip.mp4", "clip.webm", "clip.avi"])
def test_decoded_frames_are_the_sampled_ones(media, name):
    info = video_info(media / name, 2.0)
    assert (info.frames, info.fps, info.duration, info.height, info.width) == (6, 3.0, 2.0, 48, 64)
    clip = read_video(media / name, info, sample_indices(info, 2.0, 64))
    assert clip.frames.shape == (4, 3, 48, 64) and clip.frames.dtype == torch.uint8
    assert clip.indices == [0, 2, 3, 5] and clip.sampled_fps == 2.0
    assert [red_centre(f) for f in clip.frames] == pytest.approx([11.5 + 8 * i for i in clip.indices], abs=1.5)


def test_decoding_gives_the_planned_count_when_the_headers_overcount(media):
    info = video_info(media / "clip.mp4", 2.0)
    clip = read_video(media / "clip.mp4", dataclasses.replace(info, frames=12), [0, 5, 10, 11])
    assert clip.frames.shape[0] == 4 and torch.equal(clip.frames[2], clip.frames[1])  # frame 5, the last, stands in


def test_a_frames_folder_in_name_order(media):
    info = video_info(media / "frames", 2.0)
    assert (info.frames, info.folder, info.height, info.width) == (6, True, 48, 64)
    clip = read_video(media / "frames", info, sample_indices(info, 2.0, 64))
    assert clip.indices == [0, 1, 2, 3, 4, 5]  # an even count: none repeated
    assert [red_centre(f) for f in clip.frames] == [11.5, 19.5, 27.5, 35.5, 43.5, 11.5]  # frame_10 last


def test_video_tokens_are_the_processors_own(tiny, media):
    _, processor = tiny
    ds = build_dataset(str(media / "mixed.jsonl"), DataConfig(), processor, "train")
    item, sample = ds[0], ds.items[0].sample
    clips = load_videos(sample, DataConfig())
    text = processor.apply_chat_template(to_chat(sample), tokenize=False)
    own = processor(text=[text], images=load_images(sample), videos=[c.frames for c in clips], return_tensors="pt")
    assert item["input_ids"] == own["input_ids"][0].tolist()
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        assert torch.equal(item[key], own[key]), key
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert item["video_grid_thw"].tolist() == [[2, 6, 8]]  # 4 frames of 48x64 in 8 px patches
    assert item["input_ids"].count(video_id) == 2 * 6 * 8 // 4 == 24
    assert "<|vision_start|><|video_pad|><|vision_end|>where does it go?" in text  # as the template renders it
    # Counted from the headers alone at check time: the same length.
    assert ds.items[0].length == len(item["input_ids"]) and ds.items[3].length == len(ds[3]["input_ids"])


def test_per_frame_pixel_bounds(tiny, media):
    _, processor = tiny
    data = DataConfig(video_max_pixels=32 * 32)
    ds = build_dataset(str(media / "mixed.jsonl"), data, processor, "train")
    grid = ds[0]["video_grid_thw"].tolist()[0]
    assert grid == [2, 2, 4] and grid[1] * grid[2] * 8 * 8 <= 32 * 32  # each frame within the bound


def _problems(path: Path) -> list[Problem]:
    return [p for p in read_file(path) if isinstance(p, Problem)]


def test_reading_problems_name_the_sample(media, tmp_path):
    rows = [
        {"messages": turns("<video>Go?", "right"), "videos": [str(media / "clip.mp4")]},
        {"messages": turns("<video><video>Go?", "right"), "videos": [str(media / "clip.mp4")]},
        {"messages": turns("<video>Go?", "right"), "videos": ["nope.mp4"]},
        {"messages": turns("<video>Go?", "it went <video>"), "videos": [str(media / "clip.mp4")] * 2},
        {"messages": turns("Listen.", "ok"), "audios": ["a.wav"]},
        {"messages": turns("<video>Go?", "right"), "videos": [3]},
    ]
    path = write_jsonl(tmp_path / "v.jsonl", rows)
    got = [(p.where, p.kind) for p in _problems(path)]
    assert got == [
        (f"{path}:2", "video count"),
        (f"{path}:3", "video missing"),
        (f"{path}:4", "video in answer"),
        (f"{path}:5", "bad sample"),
        (f"{path}:6", "bad sample"),
    ]
    messages = {p.where: p.message for p in _problems(path)}
    assert "2 '<video>' placeholder(s) but 1 video(s)" in messages[f"{path}:2"]
    assert f"video '{tmp_path / 'nope.mp4'}' does not exist" in messages[f"{path}:3"]
    assert "audio" in messages[f"{path}:5"] and "images and videos only" in messages[f"{path}:5"]
    (sample,) = [s for s in read_file(path) if isinstance(s, Sample)]
    assert sample.videos == [media / "clip.mp4"] and sample.where == f"{path}:1"
    finder = DuplicateFinder()
    assert finder.check(sample) is None
    other = Sample(sample.messages, where="b.jsonl:1", videos=[media / "clip.webm"])
    assert finder.check(other) is None  # the same text about another video is not a duplicate
    assert finder.check(Sample(sample.messages, where="c.jsonl:1", videos=[media / "clip.mp4"])).kind == "duplicate"


def test_unreadable_videos_and_a_family_without_videos(tiny, media, tmp_path):
    from tests.tiny_families import llava, qwen3_vl

    _, processor = tiny
    (tmp_path / "empty").mkdir()
    (tmp_path / "clip.txt").write_text("text")
    for path, says in [
        (media / "corrupt.mp4", "cannot be opened"),
        (tmp_path / "empty", "holds no frame images"),
        (tmp_path / "clip.txt", "is not a video (suffix '.txt'); a video is a video file (.mp4"),
    ]:
        checked = check_sample(
            Sample(turns("<video>Go?", "right"), where="d.jsonl:7", videos=[path]), processor, DataConfig()
        )
        (problem,) = checked.problems
        assert (problem.where, problem.kind, checked.outcome) == ("d.jsonl:7", "video unreadable", "bad")
        assert str(path) in problem.message and says in problem.message
    good = Sample([("user", "<video>Go?"), ("assistant", "right")], where="d.jsonl:8", videos=[media / "clip.mp4"])
    (problem,) = check_sample(good, llava()[1], DataConfig()).problems
    assert (
        problem.kind == "video unsupported"
        and "this model's processor (LlavaProcessor) takes no videos" in problem.message
    )
    (problem,) = check_sample(good, qwen3_vl()[1], DataConfig()).problems  # frame timestamps in its prompts
    assert problem.kind == "video unsupported" and "Qwen3VLProcessor" in problem.message


def test_data_check_names_a_broken_video(tiny_dir, media, tmp_path, capsys):
    from vlmtune.commands.data import run_check

    rows = [
        {"messages": turns("<video>Go?", "right"), "videos": [str(media / name)]}
        for name in ("clip.mp4", "corrupt.mp4")
    ]
    path = write_jsonl(tmp_path / "check.jsonl", rows)
    assert run_check(str(path), [f"model.path={tiny_dir}"], progress=False) == 1
    out = capsys.readouterr().out
    assert f"{path}:2: video '{media / 'corrupt.mp4'}' cannot be opened" in out and f"{path}:1:" not in out
    assert any(line.startswith("video unreadable") for line in out.splitlines())


def test_the_length_limit_never_cuts_a_video(tiny, media):
    _, processor = tiny
    messages = [("user", "<video>Which side does the shape move to?"), ("assistant", "right " * 20)]
    sample = Sample(messages, where="v.jsonl:1", videos=[media / "clip.mp4"])
    full = check_sample(sample, processor, DataConfig())
    counts = video_token_counts(processor, [video_info(media / "clip.mp4", 2.0)], 2.0, 64, None, None)
    enc = encode_text(processor, to_chat(sample), [], counts)
    video_end = enc.vision_end
    assert full.video_tokens == counts[0] == 24 and enc.video_spans == [(video_end - 24, video_end)]
    cut = check_sample(sample, processor, DataConfig(max_length=video_end - 1, too_long="truncate"))
    assert cut.outcome == "dropped" and "24 video tokens for 1 video(s)" in cut.problems[0].message
    assert check_sample(sample, processor, DataConfig(max_length=video_end + 3, too_long="truncate")).outcome == (
        "dropped"  # no answer token left before the cut
    )
    data = DataConfig(max_length=full.length - 5, too_long="truncate")
    kept = check_sample(sample, processor, data)
    assert kept.outcome == "truncated" and kept.item.length == full.length - 5
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert VLMDataset([sample], processor, data)[0]["input_ids"].count(video_id) == 24
    # downscale: each frame's bound halves until it fits (48x64 frames: 12 tokens at 2048 pixels a frame)
    data = DataConfig(max_length=full.length - 6, too_long="downscale")
    small = check_sample(sample, processor, data)
    assert small.outcome == "downscaled" and small.item.video_max_pixels == 2048
    ds = VLMDataset([sample], processor, data)
    assert ds[0]["video_grid_thw"].tolist() == [[2, 4, 6]] and len(ds[0]["input_ids"]) == full.length - 12


def test_motion_task(tmp_path):
    from vlmtune.data.shapes import BACKGROUND, DIRECTIONS, MOTION_QUESTION, corpus_texts, generate_shapes
    from vlmtune.model.tiny_qwen import build_tokenizer

    path = generate_shapes(tmp_path / "a", 8, "motion", seed=0)
    again = generate_shapes(tmp_path / "b", 8, "motion", seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [p.read_bytes() for p in sorted((tmp_path / "a").rglob("*.mp4"))] == [
        p.read_bytes() for p in sorted((tmp_path / "b").rglob("*.mp4"))
    ] and path.read_bytes() == again.read_bytes()
    answers = [r["messages"][1]["content"] for r in rows]
    assert sorted(answers) == sorted(DIRECTIONS * 2)  # balanced
    for row, answer in zip(rows, answers):
        assert row["messages"][0]["content"] == "<video>" + MOTION_QUESTION and set(row) == {"messages", "videos"}
        video = path.parent / row["videos"][0]
        info = video_info(video, 2.0)
        frames = read_video(video, info, sample_indices(info, 2.0, 64)).frames
        assert frames.shape == (4, 3, 64, 64)
        background = torch.tensor(BACKGROUND)[:, None, None]
        spot = [torch.nonzero((frames[k].int() - background).abs().sum(0) > 60).float().mean(0) for k in (0, 3)]
        (dy, dx) = (spot[1] - spot[0]).tolist()
        moved = {"left": -dx, "right": dx, "top": -dy, "bottom": dy}
        assert moved[answer] > 20 and max(moved.values()) == moved[answer], (answer, moved)
    # The builtin base's corpus (and tokenizer) are unchanged; the answers are among its words.
    words = {w for text in corpus_texts() for w in text.replace(",", " ").split()}
    assert set(DIRECTIONS) <= words and MOTION_QUESTION not in corpus_texts()
    tok = build_tokenizer(corpus_texts())
    for text in (MOTION_QUESTION, *DIRECTIONS):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id is None and tok.decode(ids) == text
