"""Builds one candidate builtin base and probes it (how bench/BASE.md was measured).

    python bench/base_candidates.py '{"name": "v4", "steps": 1000}'
    python bench/base_candidates.py '{"name": "p32", "patch": 32, "minpx": 4096, "steps": 800, "threads": 1}'

Keys (all optional but name): patch, merge (the processor's and the config's), minpx, maxpx (the processor's min_pixels, max_pixels),
vd, vh, vdepth, th, tl (vision width, heads, depth; text width, layers), theta (the language model's rope_theta),
mean (the processor's image_mean), bg (the shapes' background colour), tasks (the pretraining mixture, a list of
task names; a name twice doubles its share), steps, lr, bs, warm, images, seed (the recipe of builtin/base.py with
these changed), area (every shape of a size drawn with the same area), radii ([small, large] shape sizes as fractions
of the image), imsize (image side in pixels), outline (an outline width in pixels; outline_color), tower (pretrain
the vision tower first: {TowerRecipe fields}, builtin/tower.py), extra ({"any": {config overrides}}), threads
(torch threads). Each candidate gets its own folder
under runs/base_candidates/NAME and its own VLMTUNE_CACHE there; the last line printed is its probe.
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

a = json.loads(sys.argv[1])
out = Path("runs/base_candidates") / a["name"]
os.environ["VLMTUNE_CACHE"] = str(out) + "_cache"

import torch  # noqa: E402

torch.set_num_threads(a.get("threads", 2))

from transformers import AutoProcessor, Qwen2VLForConditionalGeneration  # noqa: E402

import vlmtune.data.shapes as S  # noqa: E402
from vlmtune.builtin import base as B  # noqa: E402
from vlmtune.config.overrides import deep_merge  # noqa: E402
from vlmtune.config.schema import Config  # noqa: E402
from vlmtune.eval.probe import probe_base, probe_table  # noqa: E402
from vlmtune.model.tiny_qwen import build_processor, build_tokenizer, tiny_config  # noqa: E402
from vlmtune.train.recipe import train  # noqa: E402

if "bg" in a:
    S.BACKGROUND = tuple(a["bg"])
if "tasks" in a:
    S.PRETRAIN_TASKS = tuple(a["tasks"])
if "area" in a:
    # Every shape of a size gets the same area (the triangle's, 2 r^2), so area no longer tells the shape;
    # "radii": [small, large] fractions of the image (default 0.09, 0.2).
    small, large = a.get("radii", [0.09, 0.2])

    def _equal_area(img, scene, cx, cy, radius):
        r = S.IMAGE_SIZE * (small if scene.size == "small" else large)
        fill = S.COLORS[scene.color]
        draw = S.ImageDraw.Draw(img)
        if scene.shape == "circle":
            c = r * (2 / 3.141592653589793) ** 0.5
            draw.ellipse((cx - c, cy - c, cx + c, cy + c), fill=fill)
        elif scene.shape == "square":
            h = r / 2**0.5
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)

    S._draw = _equal_area
elif "radii" in a:
    # Larger or smaller shapes: "radii": [small, large] fractions of the image (default 0.09, 0.2).
    _draw = S._draw

    def _scaled(img, scene, cx, cy, radius):
        size = a["radii"][0] if scene.size == "small" else a["radii"][1]
        _draw(img, scene, cx, cy, size * img.width)

    S._draw = _scaled
if "outline" in a:
    # Every shape drawn with an outline of "outline" pixels in "outline_color" (default black): an edge that looks
    # the same whatever the fill colour.
    def _outlined(img, scene, cx, cy, radius):
        if "radii" in a:  # both: the shapes' sizes, then the outline
            radius = (a["radii"][0] if scene.size == "small" else a["radii"][1]) * img.width
        fill, line = S.COLORS[scene.color], tuple(a.get("outline_color", (0, 0, 0)))
        draw = S.ImageDraw.Draw(img)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        kw = {"fill": fill, "outline": line, "width": a["outline"]}
        if scene.shape == "circle":
            draw.ellipse(box, **kw)
        elif scene.shape == "square":
            draw.rectangle(box, **kw)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], **kw)

    S._draw = _outlined
if "imsize" in a:
    # Every image drawn at "imsize" pixels (default 64), the training data's and the probe's.
    import vlmtune.eval.probe as P

    _render = S.render_scene

    def _render_at(scene, image_size=S.IMAGE_SIZE):
        return _render(scene, a["imsize"])

    S.render_scene = P.render_scene = _render_at
shutil.rmtree(out, ignore_errors=True)
started = time.time()
tok = build_tokenizer(S.corpus_texts())
proc = build_processor(
    tok,
    min_pixels=a.get("minpx", 32 * 32),
    max_pixels=a.get("maxpx", 128 * 128),
    patch_size=a.get("patch", 8),
    merge_size=a.get("merge", 2),
    image_mean=a.get("mean"),
)
torch.manual_seed(0)
model_config = tiny_config(
    tok,
    text_hidden=a.get("th", 128),
    text_layers=a.get("tl", 2),
    vision_dim=a.get("vd", 64),
    vision_depth=a.get("vdepth", 2),
    rope_theta=a.get("theta", B.ROPE_THETA),
    patch_size=a.get("patch", 8),
    vision_heads=a.get("vh", 2),
    merge_size=a.get("merge", 2),
)
model = Qwen2VLForConditionalGeneration(model_config)
if "tower" in a:  # the tower stage first ({} for its defaults), then the language model's pretraining
    from vlmtune.builtin.tower import TowerRecipe, pretrain_tower

    tower = pretrain_tower(model, proc, TowerRecipe(**a["tower"]))
    print("TOWER", json.dumps(tower), "s", round(time.time() - started, 1), flush=True)
model.save_pretrained(out / "init", safe_serialization=True)
proc.save_pretrained(out / "init")
t = B.PRETRAIN["train"]
recipe = deep_merge(
    B.PRETRAIN,
    {
        "model": {"path": str(out / "init")},
        "train": {
            "output_dir": str(out / "run"),
            "progress_bar": False,
            "max_steps": a.get("steps", t["max_steps"]),
            "learning_rate": a.get("lr", t["learning_rate"]),
            "batch_size": a.get("bs", t["batch_size"]),
            "warmup_steps": a.get("warm", t["warmup_steps"]),
            "logging_steps": 50,
            "seed": a.get("seed", 0),
        },
        "data": {"builtin_train_samples": a.get("images", B.PRETRAIN["data"]["builtin_train_samples"])},
    },
)
for overrides in a.get("extra", {}).values():
    recipe = deep_merge(recipe, overrides)
result = train(Config.model_validate(recipe))
trained = time.time() - started
final = result.final_dir
probe = probe_base(Qwen2VLForConditionalGeneration.from_pretrained(final), AutoProcessor.from_pretrained(final))
print(probe_table(probe, 32))
found = {k: round(v.exact_match, 3) for k, v in probe.kinds.items()}
print("RESULT", a["name"], json.dumps(found), "gap", round(probe.gap, 3), "train_s", round(trained, 1))
