"""Synthetic "shapes" dataset: one coloured shape per image, with questions about it.

Everything is generated on demand and is fully determined by its arguments, so tests,
examples and benchmarks never need a download and two runs produce byte-identical
files. The output is LLaMA-Factory's multimodal ShareGPT layout (``messages`` +
``images``, or ``videos`` for the video task), with paths relative to the JSONL file so a folder can be moved.

The video task, ``motion``, writes short mp4 files (H.264, a few frames) of a shape moving toward one side. It is not
part of the builtin base's pre-training (neither its mixture nor its tokenizer's corpus): its answers are words the
corpus has (the positions' ``left``, ``right``, ``top``, ``bottom``), its question is new text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
# The mean colour Qwen2-VL's processor subtracts (CLIP's, 0.481 / 0.458 / 0.408), so a background pixel normalises
# to about zero and a patch's features come from the shape alone. On a light grey (220) background, which normalises
# to about +1.5, the builtin base's pretraining stayed on its answers' text-only floor (image-ablation gap 0.00)
# for whole runs; on this one it leaves the floor by step ~150 (experiments with the probe, vlmtune.eval.probe).
BACKGROUND: tuple[int, int, int] = (122, 116, 104)
IMAGE_SIZE = 64  # width and height of a generated image (or video frame) in pixels

# Questions of the single-image tasks; each answer is one attribute of the scene.
QUESTIONS: dict[str, str] = {
    "caption": "Describe the image.",
    "attributes": "List the color, shape, size and position.",
    "color": "What color is the shape?",
    "shape": "What shape is in the image?",
    "size": "Is the shape small or large?",
    "position": "Where is the shape?",
}
COMPARE_QUESTION = "Do the two shapes have the same color?"
MOTION_QUESTION = "Which side does the shape move to?"
DIRECTIONS: tuple[str, ...] = ("left", "right", "top", "bottom")  # words of the corpus (the positions')
MOTION_FRAMES = 4
MOTION_FPS = 2  # 4 frames at 2 fps: 2 seconds, all taken at the default data.video_fps (2 temporal patches)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
SYSTEM_PROMPTS: tuple[str, ...] = (
    DEFAULT_SYSTEM_PROMPT,
    "You are a helpful assistant that describes images.",
    "Answer with a few words.",
)
# The colour question is left out on purpose: it is the held-out fine-tuning task (the
# quickstart). Its answer tokens are still emitted in pre-training, at the start of the
# attributes answer: an output token a base never emits keeps its random lm_head row, and
# no adapter that leaves lm_head frozen can make it likely.
PRETRAIN_TASKS: tuple[str, ...] = ("caption", "attributes", "shape", "size", "position")
# Preference data on the held-out colour question: ``color-pairs`` (DPO: the right colour chosen, another one
# rejected, in LLaMA-Factory's ranking layout) and ``color-kto`` (KTO: half the answers right and labelled
# desirable, half wrong and labelled undesirable, in LLaMA-Factory's kto_tag layout).
PREFERENCE_TASKS: tuple[str, ...] = ("color-pairs", "color-kto")
TASKS: tuple[str, ...] = (*QUESTIONS, "compare", "pretrain", "motion", *PREFERENCE_TASKS)

_TWO_TURN_RATE = 0.1
_SYSTEM_RATE = 0.1


@dataclass(frozen=True)
class Scene:
    """One image's content; ``jitter`` moves the shape inside its quadrant (fractions of the free room)."""

    shape: str
    color: str
    size: str
    position: str
    jitter: tuple[float, float] = (0.5, 0.5)

    def caption(self) -> str:
        """Returns the caption, e.g. "a small red circle at the top left"."""
        return f"a {self.size} {self.color} {self.shape} at the {self.position}"

    def answer(self, task: str) -> str:
        """Returns the answer to a single-image task's question about this scene."""
        if task == "caption":
            return self.caption()
        if task == "attributes":
            return f"{self.color}, {self.shape}, {self.size}, {self.position}"
        if task in ("color", "shape", "size", "position"):
            return getattr(self, task)
        raise ValueError(f"task {task!r} is not a single-image question task")


# Bump when the samples' text changes in a way the fingerprint below cannot see (their templates, the task mixture).
GENERATOR_VERSION = 1


@functools.cache
def fingerprint() -> str:
    """A short hash of what this generator draws and asks: its vocabularies, questions, background and a few rendered
    scenes. Cached builtin data lives under a folder named with it, so data made by another version (an earlier
    background, say, which a base pretrained on this one reads badly) is never reused."""
    h = hashlib.sha1()
    fixed = [GENERATOR_VERSION, SHAPES, COLORS, SIZES, POSITIONS, BACKGROUND, IMAGE_SIZE, QUESTIONS, COMPARE_QUESTION]
    fixed += [MOTION_QUESTION, DIRECTIONS, MOTION_FRAMES, MOTION_FPS, SYSTEM_PROMPTS, PRETRAIN_TASKS]
    h.update(json.dumps(fixed, sort_keys=True).encode())
    rng = random.Random("fingerprint")
    for shape in SHAPES:
        for size in SIZES:
            scene = Scene(shape, rng.choice(list(COLORS)), size, rng.choice(POSITIONS), (rng.random(), rng.random()))
            h.update(render_scene(scene).tobytes())
    return h.hexdigest()[:10]


def random_scene(rng: random.Random, color: str | None = None) -> Scene:
    """Draws a scene from ``rng`` (``color`` fixes the colour, the rest stays random)."""
    return Scene(
        shape=rng.choice(SHAPES),
        color=color if color is not None else rng.choice(list(COLORS)),
        size=rng.choice(SIZES),
        position=rng.choice(POSITIONS),
        jitter=(rng.random(), rng.random()),
    )


def render_scene(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draws ``scene`` on a ``image_size`` x ``image_size`` RGB image (the ``BACKGROUND`` colour)."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    half = image_size / 2
    radius = image_size * (0.09 if scene.size == "small" else 0.2)
    # The centre moves within the quadrant but the shape never leaves it, so the
    # position answer is always unambiguous.
    room = max(0.0, half / 2 - radius - 1)
    left = scene.position.endswith("left")
    top = scene.position.startswith("top")
    cx = (half / 2 if left else 1.5 * half) + (2 * scene.jitter[0] - 1) * room
    cy = (half / 2 if top else 1.5 * half) + (2 * scene.jitter[1] - 1) * room
    _draw(img, scene, cx, cy, radius)
    return img


def _draw(img: Image.Image, scene: Scene, cx: float, cy: float, radius: float) -> None:
    fill = COLORS[scene.color]
    draw = ImageDraw.Draw(img)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)


def render_motion(
    scene: Scene, direction: str, image_size: int = IMAGE_SIZE, frames: int = MOTION_FRAMES
) -> list[Image.Image]:
    """Frames of ``scene``'s shape moving in a straight line from a quarter of the image to three quarters, toward
    ``direction`` (one of ``DIRECTIONS``); the other coordinate comes from the scene's jitter."""
    radius = image_size * (0.09 if scene.size == "small" else 0.15)
    toward = direction in ("right", "bottom")
    across = image_size * (0.3 + 0.4 * scene.jitter[0])
    out = []
    for k in range(frames):
        along = image_size * (0.25 + 0.5 * (k / (frames - 1) if toward else 1 - k / (frames - 1)))
        cx, cy = (along, across) if direction in ("left", "right") else (across, along)
        img = Image.new("RGB", (image_size, image_size), BACKGROUND)
        _draw(img, scene, cx, cy, radius)
        out.append(img)
    return out


def write_video(path: Path, frames: list[Image.Image], fps: int = MOTION_FPS) -> None:
    """Writes frames as an H.264 mp4 with PyAV (one encoder thread: the same frames give the same bytes)."""
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"threads": "1"})
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())


def _single(scene: Scene, task: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": "<image>" + QUESTIONS[task]},
        {"role": "assistant", "content": scene.answer(task)},
    ]


def _pretrain(scene: Scene, rng: random.Random) -> list[dict[str, str]]:
    if rng.random() < _TWO_TURN_RATE:
        first, second = rng.sample(PRETRAIN_TASKS, 2)
        # The image is attached to the first user turn only: one placeholder per image.
        messages = _single(scene, first) + [
            {"role": "user", "content": QUESTIONS[second]},
            {"role": "assistant", "content": scene.answer(second)},
        ]
    else:
        messages = _single(scene, rng.choice(PRETRAIN_TASKS))
    if rng.random() < _SYSTEM_RATE:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return messages


def _compare(rng: random.Random, same: bool) -> tuple[list[Scene], list[dict[str, str]]]:
    first = random_scene(rng)
    other = first.color if same else rng.choice([c for c in COLORS if c != first.color])
    messages = [
        {"role": "user", "content": "<image><image>" + COMPARE_QUESTION},
        {"role": "assistant", "content": "yes" if same else "no"},
    ]
    return [first, random_scene(rng, color=other)], messages


def generate_shapes(
    out_dir: str | Path,
    num_samples: int,
    task: str,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    name: str = "data",
) -> Path:
    """Writes a shapes dataset in LLaMA-Factory's multimodal ShareGPT format.

    Args:
        out_dir: Folder to write into; created if missing. Images go to ``out_dir/images``, videos to ``out_dir/videos``.
        num_samples: Number of samples (JSONL lines).
        task: One of ``TASKS``.
        seed: Random seed; together with ``task`` it fixes every scene.
        image_size: Width and height of each image (or video frame) in pixels.
        name: Base name of the JSONL file and prefix of its image files, so several splits
            can share one folder.

    Returns:
        Path of the JSONL file ``out_dir/{name}.jsonl``.

    Raises:
        ValueError: If ``task`` is unknown, ``num_samples`` is negative or ``name`` is not
            a plain file name.
    """
    if task not in TASKS:
        raise ValueError(f"unknown shapes task {task!r}; expected one of {', '.join(TASKS)}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if not name or Path(name).name != name:
        raise ValueError(f"name must be a plain file name, got {name!r}")
    out = Path(out_dir)
    if task == "motion":
        return _generate_motion(out, num_samples, seed, image_size, name)
    (out / "images").mkdir(parents=True, exist_ok=True)
    # A string seed is hashed with SHA-512 by random.Random, so it is stable across
    # processes; mixing in the task keeps different tasks from sharing the same images.
    rng = random.Random(f"shapes/{task}/{seed}")
    # An exact half of "yes" answers, in shuffled order, so that "always yes" scores 50%.
    same_flags = [i % 2 == 0 for i in range(num_samples)]
    rng.shuffle(same_flags)
    lines = []
    for i in range(num_samples):
        extra: dict = {}
        if task == "compare":
            scenes, messages = _compare(rng, same_flags[i])
        elif task in PREFERENCE_TASKS:
            scenes = [random_scene(rng)]
            messages, extra = _preference(scenes[0], rng, task, same_flags[i])
        else:
            scenes = [random_scene(rng)]
            messages = _pretrain(scenes[0], rng) if task == "pretrain" else _single(scenes[0], task)
        images = []
        for j, scene in enumerate(scenes):
            rel = f"images/{name}_{i:06d}_{j}.png"
            render_scene(scene, image_size).save(out / rel, format="PNG")
            images.append(rel)
        lines.append(json.dumps({"messages": messages, **extra, "images": images}))
    path = out / f"{name}.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _preference(scene: Scene, rng: random.Random, task: str, desirable: bool) -> tuple[list[dict], dict]:
    """The colour question with a right and a wrong answer: a pair (``color-pairs``), or one of them with its
    label (``color-kto``: right and labelled desirable for an exact half of the samples)."""
    wrong = rng.choice([c for c in COLORS if c != scene.color])
    question = [{"role": "user", "content": "<image>" + QUESTIONS["color"]}]
    if task == "color-pairs":
        return question, {
            "chosen": {"role": "assistant", "content": scene.color},
            "rejected": {"role": "assistant", "content": wrong},
        }
    answer = scene.color if desirable else wrong
    return [*question, {"role": "assistant", "content": answer}], {"kto_tag": desirable}


def _generate_motion(out: Path, num_samples: int, seed: int, image_size: int, name: str) -> Path:
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"shapes/motion/{seed}")
    directions = [DIRECTIONS[i % len(DIRECTIONS)] for i in range(num_samples)]  # each answer equally often
    rng.shuffle(directions)
    lines = []
    for i, direction in enumerate(directions):
        rel = f"videos/{name}_{i:06d}.mp4"
        write_video(out / rel, render_motion(random_scene(rng), direction, image_size))
        messages = [
            {"role": "user", "content": "<video>" + MOTION_QUESTION},
            {"role": "assistant", "content": direction},
        ]
        lines.append(json.dumps({"messages": messages, "videos": [rel]}))
    path = out / f"{name}.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def corpus_texts() -> list[str]:
    """Returns every text the generator can produce, to train the tiny tokenizer on.

    Returns:
        Questions, answers, all captions, system prompts and role names, without duplicates.
    """
    texts = ["system", "user", "assistant", *SYSTEM_PROMPTS, *QUESTIONS.values(), COMPARE_QUESTION]
    texts += [*SHAPES, *COLORS, *SIZES, *POSITIONS, "yes", "no"]
    texts += [
        Scene(shape, color, size, position).answer(task)
        for task in ("caption", "attributes")
        for shape in SHAPES
        for color in COLORS
        for size in SIZES
        for position in POSITIONS
    ]
    return list(dict.fromkeys(texts))
