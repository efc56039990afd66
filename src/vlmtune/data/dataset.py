"""Samples -> a training dataset whose every sample was checked and fits max_length without cutting an image.

Sources: a JSON/JSONL file, a name in ``dataset_dir/dataset_info.json`` (LLaMA-Factory's registry of
datasets), or ``builtin:shapes:TASK`` (generated on demand). Every sample goes through ``check_sample``, the
same checks ``vlmtune data check`` reports: its images are opened and decoded, compared with the
processor's minimum size, its videos opened and decoded (and refused for a family whose processor takes none), and
its length (image and video tokens included) is held against ``data.max_length``. Bad
samples stop the run with every problem listed (``data.on_bad_sample: error``) or are skipped and counted
(``skip``); over-long ones are dropped, downscaled or text-truncated as configured. All of it is in the report.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import Dataset

from vlmtune.config.data import DataConfig
from vlmtune.data.augment import Augmenter
from vlmtune.data.chat import IGNORE, to_chat
from vlmtune.data.collate import CACHED, PER_TOKEN, downscale, encode_example, encode_with_processor
from vlmtune.data.counted import (
    counts_image_tokens,
    encode_text,
    grid_token_counts,
    image_grid,
    image_token_counts,
    process_videos,
    temporal_patch,
    video_refusal,
    video_token_counts,
)
from vlmtune.data.kept import LengthReport
from vlmtune.data.kinds import method_problems
from vlmtune.data.media import inspect_images, inspect_videos, load_images, load_videos
from vlmtune.data.pairs import method_item, rejected_variant
from vlmtune.data.sharegpt import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, DataError, Problem, Sample
from vlmtune.data.sources import iter_split
from vlmtune.data.video import VideoInfo


@dataclass
class _Item:
    sample: Sample
    max_pixels: int | None
    truncate_at: int | None
    length: int
    sizes: list[tuple[int, int]]  # (height, width) of each image, from the checks
    videos: list[VideoInfo] = field(default_factory=list)  # each video's metadata, from the checks
    video_max_pixels: int | None = None  # the per-frame bound its video tokens were counted at
    answers: int = 0  # labelled tokens a position predicts: the rows of its logits with train.label_only_logits


@dataclass
class Checked:
    """What ``check_sample`` found for one sample."""

    sample: Sample
    problems: list[Problem]  # errors (image unreadable or too small), or the "too long" warning
    item: _Item | None  # what the dataset keeps; None when the sample is bad or dropped
    outcome: str  # "kept", "downscaled", "truncated", "dropped" or "bad"
    length: int | None = None  # tokens at the configured pixel bounds, image and video tokens included
    image_tokens: int = 0
    video_tokens: int = 0


def control_tokens(processor) -> tuple[str, ...]:
    """The tokenizer's special tokens that a sample's text must not contain (the template's turn markers, image and
    video pads, end of text): typed as text they would be read as control tokens and silently change the
    conversation. vlmtune's own placeholders (``<image>``, ``<video>``) are not among them."""
    tok = processor.tokenizer
    try:
        return _CONTROL_TOKENS[tok]
    except (KeyError, TypeError):
        pass
    special = set(tok.all_special_tokens)
    special |= {str(t) for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    found = tuple(sorted(s for s in special if s and s not in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)))
    try:
        _CONTROL_TOKENS[tok] = found
    except TypeError:  # a tokenizer that cannot be weakly referenced: computed again next time
        pass
    return found


_CONTROL_TOKENS: weakref.WeakKeyDictionary = (
    weakref.WeakKeyDictionary()
)  # per tokenizer: computed once, asked per sample


def check_sample(sample: Sample, processor, data: DataConfig) -> Checked:
    """Images opened (and decoded), sizes checked, videos opened (and decoded) for a family that takes them, no
    control token typed as text, length with image and video tokens against ``data.max_length``."""
    sizes, problems = inspect_images(sample, processor, data.decode_images)
    videos: list[VideoInfo] = []
    if sample.videos and (why := video_refusal(processor)) is not None:
        problems.append(Problem(sample.where, "video unsupported", f"{len(sample.videos)} video(s), but {why}"))
    elif sample.videos:
        videos, found = inspect_videos(sample, data)
        problems += found
    controls = control_tokens(processor)
    turns = list(sample.messages) + ([("rejected answer", sample.rejected)] if sample.rejected else [])
    for i, (role, content) in enumerate(turns):
        typed = [c for c in controls if c in content]
        if typed:
            problems.append(
                Problem(
                    sample.where,
                    "control token",
                    f"{role} turn {i} contains {', '.join(repr(c) for c in typed)}: the model's chat template uses "
                    "it as a control token, so the text would change the conversation; remove or rewrite it",
                )
            )
    if problems:
        return Checked(sample, problems, None, "bad")
    limit, policy = data.max_length, data.too_long
    video_pixels = data.video_max_pixels
    try:
        enc = _encode(processor, data, sample, sizes, data.image_max_pixels, videos, video_pixels)
    except ValueError as e:  # the chat template cannot place the answers, the images or the videos
        return Checked(sample, [Problem(sample.where, "bad sample", str(e))], None, "bad")
    length = len(enc.input_ids)
    image_tokens = sum(e - s for s, e in enc.image_spans)
    video_tokens = sum(e - s for s, e in enc.video_spans)
    done = Checked(sample, [], None, "kept", length, image_tokens, video_tokens)
    if length <= limit:
        answers = _answers(enc.labels)
        done.item = _Item(sample, data.image_max_pixels, None, length, sizes, videos, video_pixels, answers)
        return done
    if policy == "downscale" and (sample.images or videos):
        if counts_image_tokens(processor):
            max_pixels = data.image_max_pixels or processor.image_processor.size.get("longest_edge")
            floor = data.image_min_pixels or processor.image_processor.size.get("shortest_edge") or 1
        else:  # the image itself is shrunk before the processor sees it
            max_pixels = data.image_max_pixels or max((h * w for h, w in sizes), default=1)
            floor = data.image_min_pixels or 1
        if videos:  # each frame's bound halves with the images' (videos: counted families only)
            video_pixels = video_pixels or processor.video_processor.size["longest_edge"]
            video_floor = data.video_min_pixels or processor.video_processor.size["shortest_edge"] or 1
        small = enc
        while len(small.input_ids) > limit:
            shrink_images = bool(sample.images) and max_pixels // 2 >= floor
            shrink_videos = bool(videos) and video_pixels // 2 >= video_floor
            if not (shrink_images or shrink_videos):
                break
            if shrink_images:
                max_pixels //= 2
            if shrink_videos:
                video_pixels //= 2
            small = _encode(processor, data, sample, sizes, max_pixels, videos, video_pixels)
        if len(small.input_ids) <= limit:
            kept = _Item(
                sample, max_pixels, None, len(small.input_ids), sizes, videos, video_pixels, _answers(small.labels)
            )
            done.item, done.outcome = kept, "downscaled"
    if policy == "truncate" and done.item is None:
        if enc.vision_end <= limit and any(lab != IGNORE for lab in enc.labels[:limit]):
            answers, pixels = _answers(enc.labels[:limit]), data.video_max_pixels
            kept = _Item(sample, data.image_max_pixels, limit, limit, sizes, videos, pixels, answers)
            done.item, done.outcome = kept, "truncated"
    if done.item is None:
        done.outcome = "dropped"
    of_videos = f", {video_tokens} video tokens for {len(videos)} video(s)" if videos else ""
    done.problems.append(
        Problem(
            sample.where,
            "too long",
            f"{length} tokens ({image_tokens} of them image tokens for {len(sample.images)} image(s){of_videos}) "
            f"> data.max_length={limit}; data.too_long={policy}: {done.outcome}",
        )
    )
    return done


def _answers(labels) -> int:
    """Labelled tokens that some position predicts (the first token never is)."""
    return sum(1 for lab in list(labels)[1:] if lab != IGNORE)


def _encode(
    processor,
    data: DataConfig,
    sample: Sample,
    sizes: list[tuple[int, int]],
    max_pixels: int | None,
    videos: list[VideoInfo] | None = None,
    video_max_pixels: int | None = None,
):
    if counts_image_tokens(processor):
        counts = image_token_counts(processor, sizes, data.image_min_pixels, max_pixels)
        fps, frames, low = data.video_fps, data.video_max_frames, data.video_min_pixels
        video_counts = video_token_counts(processor, videos or [], fps, frames, low, video_max_pixels)
        return encode_text(processor, to_chat(sample), counts, video_counts)
    # Token counts depend on image sizes only: blank images of the real sizes stand in for the decoded ones.
    blanks = downscale([Image.new("RGB", (w, h)) for h, w in sizes], max_pixels)
    return encode_with_processor(processor, to_chat(sample), blanks)[0]


class VLMDataset(Dataset):
    """Samples that passed the checks and fit; ``__getitem__`` decodes (and, for training, augments) images and
    returns token ids, labels and pixel inputs, or, with ``use_vision_cache``, each image's patch grid and cached
    vision features in place of its pixels (nothing decoded)."""

    def __init__(
        self,
        samples: Iterable[Sample | Problem],
        processor,
        data: DataConfig,
        split: str = "train",
        method: str = "sft",
    ):
        """Checks every sample (see ``check_sample``, and ``kinds.method_problems`` for what ``method`` needs).

        Args:
            samples: samples, with the problems found while reading them at their places (``iter_split``).
            split: "train" or "eval"; only the train split is augmented (``data.augment``).
            method: the training method the items are encoded for (``vlmtune.data.pairs.method_item``); a DPO
                pair whose rejected answer is over ``data.max_length`` is dropped (a pair is never cut).

        Raises:
            DataError: with ``data.on_bad_sample: error``, every error found; with ``skip``, the problems
                about whole files (missing, unparsable), which are never skipped.
        """
        self.processor = processor
        self.data = data
        self.split = split
        self.method = method
        self.epoch = 0
        self.augment = Augmenter(data.augment) if split == "train" and data.augment.enabled else None
        self.vision_keys = self.vision_cache = None  # set by use_vision_cache
        self.report = LengthReport()
        self.items: list[_Item] = []
        errors: list[Problem] = []
        for got in samples:
            if isinstance(got, Problem):
                problems = [got]
            else:
                checked = check_sample(got, processor, data)
                problems = checked.problems + method_problems(got, method)
                if method == "dpo" and checked.item is not None and got.rejected is not None:
                    problems += _pair_fits(checked, processor, data)
                if checked.item is not None and not any(p.is_error for p in problems):
                    self.items.append(checked.item)
                {
                    "dropped": self.report.dropped,
                    "downscaled": self.report.downscaled,
                    "truncated": self.report.truncated,
                }.get(checked.outcome, []).append(got.where)
            for p in problems:
                if p.kind == "duplicate":
                    self.report.duplicates.append(p)
                elif p.is_error:
                    errors.append(p)
        fatal = errors if data.on_bad_sample == "error" else [p for p in errors if p.whole_file]
        if fatal:
            raise DataError(fatal)
        self.report.skipped = errors
        self.report.kept = len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that augmentation draws depend on (call at the start of every epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> list[int]:
        return [it.length for it in self.items]

    def source_ids(self) -> list[int]:
        """The source (index into the split's list of sources) of each item, for weighted mixing."""
        return [it.sample.source for it in self.items]

    def use_vision_cache(self, keys, cache) -> None:
        """From now on, items carry each image's patch grid and its features read from ``cache`` (a
        ``vision_cache.VisionCache``, under its key in ``keys``, an ``ImageKeys``) instead of pixel inputs: images
        are neither decoded nor preprocessed. Videos are not cached: they are decoded and go through the (frozen)
        tower at every step. Only for a counted (Qwen-VL) family without augmentation; the cache must hold every
        image before items are read (``vision_cache.missing_images`` lists what it lacks)."""
        if self.augment is not None or not counts_image_tokens(self.processor):
            raise ValueError("the vision cache needs a Qwen-VL image processor and no augmentation")
        self.vision_keys, self.vision_cache = keys, cache.reader()

    def __getitem__(self, index: int) -> dict:
        return self.encode(self.items[index], index)

    def samples(self) -> list[Sample]:
        """The kept samples, in item order."""
        return [it.sample for it in self.items]

    def encode(self, item: _Item, index: int) -> dict:
        """A checked sample's model inputs; ``index`` (with the epoch) seeds its augmentation."""
        if self.vision_keys is not None:
            return self._cached_item(item, index)
        images = load_images(item.sample)
        if self.augment is not None:
            images = [self.augment(im, index, self.epoch, k) for k, im in enumerate(images)]
        extra = {}
        videos = self._videos(item)
        video_pixels = (self.data.video_min_pixels, item.video_max_pixels)
        enc, per_token, pixels = encode_example(
            self.processor,
            to_chat(item.sample),
            images,
            self.data.image_min_pixels,
            item.max_pixels,
            videos,
            video_pixels,
        )
        if per_token is not None:
            extra[PER_TOKEN] = {k: v[: item.truncate_at] for k, v in per_token.items()}
        out = {**_cut(item, enc), **extra, **pixels}
        if self.method == "sft":
            return out
        counts = grid_token_counts(self.processor, pixels) if counts_image_tokens(self.processor) else None
        video_counts = grid_token_counts(self.processor, pixels, "video_grid_thw") if counts is not None else None
        shown = downscale(images, item.max_pixels)
        return method_item(out, self.method, item.sample, index, self.processor, counts, video_counts, shown)

    def _videos(self, item: _Item) -> list:
        """The item's videos decoded (none decoded for a sample without videos); not augmented."""
        return load_videos(item.sample, self.data, temporal_patch(self.processor)) if item.sample.videos else []

    def _cached_item(self, item: _Item, index: int) -> dict:
        data, merge = self.data, self.processor.image_processor.merge_size
        min_pixels = data.image_min_pixels
        grids = [image_grid(self.processor, h, w, min_pixels, item.max_pixels) for h, w in item.sizes]
        video_counts = video_token_counts(
            self.processor,
            item.videos,
            data.video_fps,
            data.video_max_frames,
            data.video_min_pixels,
            item.video_max_pixels,
        )
        counts = [t * h * w // merge**2 for t, h, w in grids]
        out = _cut(item, encode_text(self.processor, to_chat(item.sample), counts, video_counts))
        out.update(process_videos(self.processor, self._videos(item), data.video_min_pixels, item.video_max_pixels))
        if grids:
            out["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
            out[CACHED] = [
                self.vision_cache.get(self.vision_keys.key(path, min_pixels, item.max_pixels), image=str(path))
                for path in item.sample.images
            ]
        if self.method == "sft":
            return out
        return method_item(out, self.method, item.sample, index, self.processor, counts, video_counts, None)


def _cut(item: _Item, enc) -> dict:
    """Token ids and labels, truncated where the item says, checked against the length its checks predicted."""
    ids, labels = enc.input_ids, enc.labels
    if item.truncate_at is not None:
        ids, labels = ids[: item.truncate_at], labels[: item.truncate_at]
    if len(ids) != item.length:
        raise RuntimeError(f"{item.sample.where}: {len(ids)} tokens after decoding its images, {item.length} predicted")
    return {"input_ids": ids, "labels": labels}


def _pair_fits(checked: Checked, processor, data: DataConfig) -> list[Problem]:
    """A DPO pair is kept whole: when its rejected answer makes it longer than ``data.max_length`` (or the chosen
    one needed cutting), it is dropped, with a "too long" problem saying so."""
    item, sample = checked.item, checked.sample
    rejected = _encode(
        processor, data, rejected_variant(sample), item.sizes, item.max_pixels, item.videos, item.video_max_pixels
    )
    n = len(rejected.input_ids)
    if n <= data.max_length and item.truncate_at is None:
        return []
    checked.item, checked.outcome = None, "dropped"
    return [
        Problem(
            sample.where,
            "too long",
            f"a preference pair whose answers take {item.length} (chosen) and {n} (rejected) tokens with "
            f"data.max_length={data.max_length}: dropped (the two answers of a pair are never cut)",
        )
    ]


def build_dataset(specs: str | list[str], data: DataConfig, processor, split: str, method: str = "sft") -> VLMDataset:
    """Reads every source of a split, checks every sample (for ``method``) and applies the length limit.

    Raises:
        DataError: see ``VLMDataset``; every problem is listed, each naming its file and line.
    """
    return VLMDataset(iter_split(specs, data, split), processor, data, split=split, method=method)
