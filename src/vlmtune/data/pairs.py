"""Samples of the preference methods as model inputs: a DPO pair's two answers and a KTO batch's mismatched
answers, as rows of one batch that share each sample's images.

A DPO pair is one conversation with two last answers. Its two rows hold the same prompt (same tokens, same images)
and differ after the last answer's start; the loss reads the last answer only (earlier turns are context). A KTO
batch's second half pairs prompt i with the answer of sample i+1 (the mismatched completions that estimate the
KL reference point): the rows are cut at the last answer's start and joined, which gives the tokens that encoding
that conversation would give, since every answer is tokenized on its own (``vlmtune.data.chat``).

For the Qwen-VL families the images travel once per sample: ``ROW_SOURCE`` says which sample's images each row
shows, and the model encodes each image once (``vlmtune.train.logps.share_vision_rows``). Other families get a copy
of the pixel inputs per row.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from vlmtune.data.chat import IGNORE, to_chat
from vlmtune.data.collate import PER_TOKEN, collate, encode_with_processor
from vlmtune.data.counted import counts_image_tokens, encode_text
from vlmtune.data.sharegpt import Sample

ROW_SOURCE = "row_source"
"""Batch key: (rows,) the sample whose images each row shows (present when the images travel once per sample)."""
IMAGES_PER_SAMPLE = "images_per_sample"
"""Batch key: (samples,) how many images each sample has (with ``ROW_SOURCE``)."""
VIDEOS_PER_SAMPLE = "videos_per_sample"
"""Batch key: (samples,) how many videos each sample has (with ``ROW_SOURCE``)."""
SAMPLE_INDEX = "sample_index"
"""Item and batch key: each sample's index in its dataset (the DPO reference cache's key)."""
REJECTED = "rejected"
"""Item key of a DPO pair: the rejected answer's token ids and labels (and per-token inputs)."""
KTO_LABEL = "kto_label"
"""Item and batch key: True for a desirable answer, False for an undesirable one."""
ANSWER_START = "answer_start"
"""Item key: where the last answer's tokens begin."""


def rejected_variant(sample: Sample) -> Sample:
    """The conversation with the rejected answer as its last turn."""
    return replace(sample, messages=[*sample.messages[:-1], ("assistant", sample.rejected)], rejected=None)


def answer_start(labels: list[int]) -> int:
    """Where the last answer (the last run of labelled tokens) starts."""
    end = max((i for i, x in enumerate(labels) if x != IGNORE), default=-1)
    if end < 0:
        raise ValueError("the sample has no answer tokens")
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return start


def last_answer_only(labels: list[int]) -> list[int]:
    """Labels of the last answer; earlier answers become context (ignored)."""
    start = answer_start(labels)
    return [IGNORE] * start + list(labels[start:])


def media_counts(item: dict) -> tuple[int, int]:
    """How many images and videos an encoded item holds."""
    images = len(item["image_grid_thw"]) if "image_grid_thw" in item else 0
    videos = len(item["video_grid_thw"]) if "video_grid_thw" in item else 0
    return images, videos


_ROW_ONLY = ("input_ids", "labels", PER_TOKEN)
_BOOKKEEPING = (REJECTED, ANSWER_START, KTO_LABEL, SAMPLE_INDEX)


def _text_row(item: dict, ids: list[int], labels: list[int], per_token: dict | None, share: bool) -> dict:
    """A row with ``item``'s pixel inputs (a copy, unless the images travel once per sample) and other tokens."""
    row = {"input_ids": ids, "labels": labels}
    if per_token is not None:
        row[PER_TOKEN] = per_token
    if not share:
        row.update({k: v for k, v in item.items() if k not in _ROW_ONLY and k not in _BOOKKEEPING})
    return row


def _first_rows(items: list[dict]) -> list[dict]:
    return [{k: v for k, v in it.items() if k not in _BOOKKEEPING} for it in items]


def _shared(out: dict, items: list[dict], share: bool) -> dict:
    """Adds the row-to-sample map (two rows per sample: the first half, then the second) and the bookkeeping."""
    n = len(items)
    if share:
        counts = [media_counts(it) for it in items]
        out[ROW_SOURCE] = torch.arange(n).repeat(2)
        out[IMAGES_PER_SAMPLE] = torch.tensor([c[0] for c in counts])
        out[VIDEOS_PER_SAMPLE] = torch.tensor([c[1] for c in counts])
    out[SAMPLE_INDEX] = torch.tensor([it[SAMPLE_INDEX] for it in items])
    return out


def collate_pairs(items: list[dict], share: bool, **collate_args) -> dict:
    """A batch of DPO pairs: rows ``0..n-1`` the chosen answers, rows ``n..2n-1`` the rejected ones."""
    second = [
        _text_row(it, it[REJECTED]["input_ids"], it[REJECTED]["labels"], it[REJECTED].get(PER_TOKEN), share)
        for it in items
    ]
    return _shared(collate(_first_rows(items) + second, **collate_args), items, share)


def collate_kto(items: list[dict], share: bool, **collate_args) -> dict:
    """A KTO batch: rows ``0..n-1`` the samples, rows ``n..2n-1`` prompt i with the answer of sample i+1 (the
    mismatched pairs whose log-ratio estimates the KL reference point); ``kto_label`` per sample."""
    n = len(items)
    second = []
    for i, it in enumerate(items):
        other = items[(i + 1) % n]
        a, b = it[ANSWER_START], other[ANSWER_START]
        ids = list(it["input_ids"][:a]) + list(other["input_ids"][b:])
        labels = [IGNORE] * a + list(other["labels"][b:])
        per_token = None
        if PER_TOKEN in it:
            per_token = {
                k: list(v[:a]) + list(other[PER_TOKEN].get(k, [0] * len(other["input_ids"]))[b:])
                for k, v in it[PER_TOKEN].items()
            }
        second.append(_text_row(it, ids, labels, per_token, share))
    out = _shared(collate(_first_rows(items) + second, **collate_args), items, share)
    out[KTO_LABEL] = torch.tensor([bool(it[KTO_LABEL]) for it in items])
    return out


def encode_rejected(
    processor,
    sample: Sample,
    counts: list[int] | None = None,
    video_counts: list[int] | None = None,
    images: list | None = None,
) -> dict:
    """The rejected answer's row of a pair: token ids, labels (the last answer only) and per-token inputs.

    Args:
        counts, video_counts: the image and video token counts (counted Qwen-VL families: text only, nothing
            decoded again).
        images: the decoded (and, as for the chosen row, downscaled) images, for every other family.
    """
    chat = to_chat(rejected_variant(sample))
    if counts_image_tokens(processor):
        enc, per_token = encode_text(processor, chat, counts or [], video_counts or []), None
    else:
        enc, per_token, _ = encode_with_processor(processor, chat, images or [])
    row = {"input_ids": enc.input_ids, "labels": last_answer_only(enc.labels)}
    if per_token is not None:
        row[PER_TOKEN] = per_token
    return row


def method_item(out: dict, method: str, sample: Sample, index: int, processor, counts, video_counts, images) -> dict:
    """An encoded item (the conversation as SFT sees it) made into what ``method`` trains on: for dpo, the last
    answer's labels and the rejected answer's row; for kto, the last answer's labels, where it starts and its label.
    Both get the sample's index (GRPO's items stay conversations: its prompts are made in the training side)."""
    if method in ("dpo", "kto"):
        out["labels"] = last_answer_only(out["labels"])
    if method == "dpo":
        out[REJECTED] = encode_rejected(processor, sample, counts, video_counts, images)
    if method == "kto":
        out[ANSWER_START] = answer_start(out["labels"])
        out[KTO_LABEL] = bool(sample.kto_label)
    if method in ("dpo", "kto"):
        out[SAMPLE_INDEX] = index
    return out
