"""The answer loss, with logits computed only where a label is (not at image or prompt tokens).

A causal LM predicts token i+1 at position i, so the loss needs the lm_head projection only at positions
whose next token is an answer token: usually a few percent of the sequence in VLM fine-tuning, where image
and prompt tokens dominate. transformers' ``logits_to_keep`` accepts a boolean (batch, length) mask and
applies the lm_head to those positions alone; the cross-entropy is then the same mean over answer tokens
that the model's own loss computes (checked in tests/train/test_loss.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmtune.data.collate import IGNORE


def answer_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens the loss averages over: labelled tokens that some position predicts."""
    return (labels[:, 1:] != IGNORE).sum()


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, length): True at positions whose next token carries a label."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def answer_loss(model, batch: dict, label_only: bool = True) -> torch.Tensor:
    """Mean cross-entropy over answer tokens; with ``label_only`` the logits exist only at those positions."""
    if not label_only:
        return model(**batch).loss
    labels = batch["labels"]
    keep = label_positions(labels)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits
    logits = logits.reshape(-1, logits.shape[-1])
    targets = labels[:, 1:][keep[:, :-1]]
    if targets.numel() == 0:  # no answer token in the batch: a zero that keeps the graph
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets)
