"""The data section of a run's config: its sources (paths, dataset names, weighted mixes), the length limit, image and
video bounds, and augmentation."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from vlmtune.config.strict import StrictModel

BUILTIN_DATA_PREFIX = "builtin:shapes:"


class DataSource(StrictModel):
    """One data source with its own settings, as an entry of data.train or data.eval."""

    path: str = Field(
        description=f"a JSON/JSONL file, a Hugging Face datasets folder or Parquet/Arrow file, a dataset_info.json name, or {BUILTIN_DATA_PREFIX}TASK"
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="this source's share of each epoch, relative to the other sources' weights (all sources weighted, or none)",
    )
    max_samples: int | None = Field(
        None, gt=0, description="read at most this many samples of this source; empty means data.max_samples"
    )


class AugmentConfig(StrictModel):
    """Seeded visual augmentation of the training split (torchvision transforms); evaluation data is never augmented."""

    enabled: bool = Field(
        False,
        description="augment training images; each draw depends only on (seed, sample, epoch), so a resumed run sees the same images",
    )
    seed: int = Field(0, description="seed of the augmentation draws")
    crop_scale: tuple[float, float] = Field(
        (0.8, 1.0),
        description="random resized crop: range of the kept area fraction ([1, 1] turns cropping off); the crop is resized back to the image's size, so the processor's pixel bounds and image-token count are unchanged",
    )
    crop_ratio: tuple[float, float] = Field(
        (0.75, 4 / 3), description="random resized crop: range of the crop's aspect ratio (width / height)"
    )
    brightness: float = Field(
        0.2, ge=0, description="colour jitter: brightness factor drawn from [1 - x, 1 + x] (0 turns it off)"
    )
    contrast: float = Field(0.2, ge=0, description="colour jitter: contrast factor drawn from [1 - x, 1 + x]")
    saturation: float = Field(0.2, ge=0, description="colour jitter: saturation factor drawn from [1 - x, 1 + x]")
    hue: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="colour jitter: hue shift drawn from [-x, x]; off by default because answers may name colours",
    )
    rotation: float = Field(5.0, ge=0, le=180, description="small rotation: angle in degrees drawn from [-x, x]")
    flip: bool = Field(
        False, description="horizontal flip with probability 0.5; off by default because answers may say left or right"
    )

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float], info) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high:
            raise ValueError(f"needs 0 < low <= high, got [{low}, {high}]")
        if info.field_name == "crop_scale" and high > 1:
            raise ValueError(f"is a fraction of the image's area, at most 1, got [{low}, {high}]")
        return value


class DataConfig(StrictModel):
    """Training and evaluation data."""

    train: str | list[str | DataSource] = Field(
        f"{BUILTIN_DATA_PREFIX}position",
        description=f"a source or a list of them, each a path or {{path, weight, max_samples}}: a JSON/JSONL file (ShareGPT, alpaca or OpenAI messages), a Hugging Face datasets folder (save_to_disk) or Parquet/Arrow file, a name in dataset_dir/dataset_info.json, or {BUILTIN_DATA_PREFIX}TASK for generated shapes data",
    )
    eval: str | list[str | DataSource] | None = Field(
        None, description="evaluation data, same forms as train; empty means no evaluation"
    )
    dataset_dir: str | None = Field(
        None, description="folder holding dataset_info.json, for dataset names (LLaMA-Factory style)"
    )
    max_length: int = Field(
        1024,
        gt=0,
        description="maximum tokens per sample, image and video tokens included; never cut inside an image's or a video's tokens",
    )
    too_long: Literal["drop", "downscale", "truncate"] = Field(
        "drop",
        description="a sample over max_length is dropped; downscale shrinks its images until it fits; truncate cuts text after the last image (all are counted and reported)",
    )
    max_samples: int | None = Field(
        None,
        gt=0,
        description="read at most this many samples from each source (its first ones, in file order); a source's own max_samples wins",
    )
    mix_epoch: Literal["sum", "under", "over"] | Annotated[int, Field(gt=0)] = Field(
        "sum",
        description="with weighted sources, the samples an epoch draws: sum (as many as all sources hold), under (until the first source is used up, LLaMA-Factory's interleave_under), over (until every source was seen whole, interleave_over) or a number; a source short of its share repeats, a larger one is subsampled afresh each epoch",
    )
    image_max_pixels: int | None = Field(
        None, gt=0, description="upper bound on an image's pixels after resizing; empty means the processor's own"
    )
    image_min_pixels: int | None = Field(
        None, gt=0, description="lower bound on an image's pixels after resizing; empty means the processor's own"
    )
    video_fps: float = Field(
        2.0, gt=0, description="frames sampled per second of a video file (a folder of frames is taken as it is)"
    )
    video_max_frames: int = Field(
        64, gt=0, description="at most this many frames per video; a longer video is sampled evenly over its length"
    )
    video_min_pixels: int | None = Field(
        None,
        gt=0,
        description="lower bound on each video frame's pixels after resizing; empty means the processor's own",
    )
    video_max_pixels: int | None = Field(
        None,
        gt=0,
        description="upper bound on each video frame's pixels after resizing; empty means the processor's own",
    )
    builtin_train_samples: int = Field(
        512, gt=0, description="number of generated samples for builtin shapes training data"
    )
    builtin_eval_samples: int = Field(
        64, gt=0, description="number of generated samples for builtin shapes evaluation data"
    )
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="data-loader worker processes (each loads, decodes and preprocesses batches ahead of the step); auto is 0 without a GPU (workers would take the training threads' cores) and, on a GPU, up to 4 per process from the cores the machine leaves each process",
    )
    on_bad_sample: Literal["error", "skip"] = Field(
        "error",
        description="a bad sample (bad JSON line, unknown role, missing or corrupt image, ...) stops the run listing every problem (error), or is left out, counted by kind and named in the run folder (skip)",
    )
    decode_images: bool = Field(
        True,
        description="fully decode every image before training to find corrupt or truncated files (a few ms per image); false reads only image headers",
    )
    load: Literal["auto", "upfront", "lazy"] = Field(
        "auto",
        description="how the training split is read: upfront reads and checks every sample before the first step (every problem reported before training); lazy (JSONL files only) keeps a byte-offset index of each file (built once, saved beside it) and reads, checks and encodes a sample when a batch needs it, so a problem is found when its sample is read; auto is lazy when every training source is JSONL and they hold over 50,000 records (and train.group_by_length is off), else upfront; evaluation data is always read upfront",
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="visual augmentation of the training split"
    )
