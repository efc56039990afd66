"""One checkpoint behind the API: prompts built as ``predict`` builds them, and a batch of requests answered by one
``model.generate`` call.

Each request of a batch keeps its own ``max_tokens`` and ``stop`` strings: a stopping criterion follows every row
as tokens come, marks it done at its end-of-sequence token, its own token limit or a stop string (transformers then
pads that row while the others go on), and hands streamed rows their new text. Rows of one batch share the sampling
settings (the batcher groups them so).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from vlmtune.config.data import DataConfig
from vlmtune.eval.alignment import token_ids, video_token_id
from vlmtune.eval.generate import GenerationSettings, eos_token_ids, left_padded, prompt_features


@dataclass(frozen=True)
class Sampling:
    """How a request decodes; requests with equal ``Sampling`` may share a ``generate`` call."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Job:
    """One request on its way through the batcher: its prompt, limits and, when streamed, where new text goes."""

    features: dict
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    sampling: Sampling = Sampling()
    on_text: Callable[[str], None] | None = None  # called from the generating thread with each new piece
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_tokens(self) -> int:
        return len(self.features["input_ids"])


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_tokens)


class _Row:
    """What one row of a batch has generated so far, and how much of its text was already streamed."""

    def __init__(self, job: Job):
        self.job, self.ids, self.text, self.sent = job, [], "", 0
        self.finish: str | None = None
        self.hold = max((len(s) for s in job.stop), default=1) - 1  # a stop string may still be forming

    def step(self, token: int, eos: set[int], decode: Callable[[list[int]], str]) -> None:
        if self.finish is not None:
            return
        if token in eos:
            self.finish = "stop"
        else:
            self.ids.append(token)
            self.text = decode(self.ids)
            cut = min((i for s in self.job.stop if (i := self.text.find(s)) >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish = self.text[:cut], "stop"
            elif len(self.ids) >= self.job.max_tokens:
                self.finish = "length"
            elif self.job.cancelled.is_set():
                self.finish = "cancelled"
        self.flush()

    def flush(self) -> None:
        """Streams the text that can no longer change: all of it once done, else up to a possible stop string's
        start and short of an unfinished multi-byte character."""
        if self.job.on_text is None:
            return
        end = len(self.text) if self.finish else len(self.text) - self.hold
        while not self.finish and end > self.sent and self.text[end - 1] == "\ufffd":
            end -= 1
        if end > self.sent:
            self.job.on_text(self.text[self.sent : end])
            self.sent = end


class _Follow(StoppingCriteria):
    """Feeds each step's new tokens to the rows and tells ``generate`` which rows are done."""

    def __init__(self, rows: list[_Row], eos: list[int], decode):
        self.rows, self.eos, self.decode = rows, set(eos), decode

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, last):
            row.step(token, self.eos, self.decode)
        return torch.tensor([r.finish is not None for r in self.rows], device=input_ids.device)


class Engine:
    """A loaded model and processor, the served name, and the prompt settings of the checkpoint's data."""

    def __init__(self, model, processor, name: str, data: DataConfig | None = None):
        self.model, self.processor, self.name = model, processor, name
        self.data = data or DataConfig()
        text_config = getattr(model.config, "text_config", model.config)
        self.context = int(getattr(text_config, "max_position_embeddings", 0) or processor.tokenizer.model_max_length)
        self.eos = eos_token_ids(model, processor)
        self.pad, self.image_id = token_ids(processor)
        self.video_id = video_token_id(processor)
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()  # one generate at a time: the model and torch's global seed are shared

    def prompt(self, messages: list[tuple[str, str]], images: list[Image.Image]) -> dict:
        """Token ids and pixel inputs of the conversation followed by the assistant-turn opening.

        Raises:
            ValueError: placeholders and images disagree, or the processor refuses the input.
        """
        return prompt_features(self.processor, messages, images, self.data.image_min_pixels, self.data.image_max_pixels)

    def decode(self, ids: list[int]) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def run(self, jobs: list[Job]) -> list[Completion]:
        """Answers every job with one ``generate`` call (they share ``jobs[0].sampling``)."""
        sampling = jobs[0].sampling
        settings = GenerationSettings(
            max_new_tokens=max(j.max_tokens for j in jobs),
            do_sample=not sampling.greedy,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
        )
        padded = left_padded([j.features for j in jobs], self.pad, self.image_id, self.video_id)
        batch = {k: v.to(self.device) for k, v in padded.items()}
        rows = [_Row(j) for j in jobs]
        follow = _Follow(rows, self.eos, self.decode)
        with self.lock:
            # A seeded request runs alone (the batcher sees to it), so its answer does not depend on its neighbours.
            torch.manual_seed(sampling.seed if sampling.seed is not None else random.randrange(2**63))
            self.model.generate(
                **batch,
                **settings.kwargs(),
                pad_token_id=self.pad,
                eos_token_id=self.eos,
                stopping_criteria=StoppingCriteriaList([follow]),
            )
        out = []
        for row in rows:
            if row.finish is None:  # generate stopped at the batch's longest max_tokens
                row.finish = "length"
            row.flush()
            finish = "stop" if row.finish == "cancelled" else row.finish
            out.append(Completion(row.text, row.job.prompt_tokens, len(row.ids), finish))
        return out
