"""GRPO on sampled completions: group-relative advantages, the clipped token loss and its aggregation.

Written by hand: no library gives these per token on batches shaped like ours.

Sources: GRPO, Shao et al. 2024 (DeepSeekMath), arXiv 2402.03300; Dr. GRPO (no std scaling, a constant
normaliser), Liu et al. 2025, arXiv 2503.20783; clip-higher (separate lower and upper clip ranges), DAPO,
Yu et al. 2025, arXiv 2503.14476. Where the papers leave a detail open, TRL's GRPO trainer is followed and
the choice is said.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Each completion's reward relative to the other completions of its prompt.

    ``A_i = r_i - mean_group(r)``, divided by ``std_group(r) + eps`` when ``scale`` (GRPO, Shao et al. 2024,
    arXiv 2402.03300); ``scale=False`` is Dr. GRPO (Liu et al. 2025, arXiv 2503.20783), which drops the
    division because it weights prompts by how uncertain their rewards are. The std is the unbiased one
    (``n - 1``), as TRL computes it. A group whose rewards are all equal gets exactly 0.

    Args:
        rewards: (N,) with ``N = groups * group_size``; consecutive rows are one prompt's group.
        group_size: Completions per prompt, at least 2.
        scale: Divide by the group's std.
        eps: Added to the std, so a near-constant group does not blow up.

    Returns:
        Advantages (N,), in the dtype of ``rewards``.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (a group of one has no relative reward), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (groups * {group_size},), got shape {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    # the mean of equal floats can differ from them in the last bit; an all-equal group has nothing to learn
    equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return advantages.masked_fill(equal, 0.0).view(-1)


@dataclass
class TokenLoss:
    """Per-token loss and what to log about it; every (N, T), zero (False) where the mask is off."""

    per_token: torch.Tensor  # the clipped surrogate, plus beta * kl when beta > 0
    kl: torch.Tensor | None  # the k3 estimate of KL(pi || ref) per token; None when beta == 0
    clipped: torch.Tensor  # bool: where the clipped term was the one taken and differs


def clipped_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> TokenLoss:
    """The PPO-style clipped surrogate per token, with an optional KL penalty toward the reference.

    ``ratio = exp(logps - old_logps)``;
    ``per_token = -min(ratio A, clamp(ratio, 1 - eps_low, 1 + eps_high) A)`` (GRPO, Shao et al. 2024,
    arXiv 2402.03300; separate ``eps_low`` and ``eps_high`` are DAPO's clip-higher, Yu et al. 2025,
    arXiv 2503.14476). With ``beta > 0`` the loss adds ``beta * kl`` where
    ``kl = exp(ref - logps) - (ref - logps) - 1``, Schulman's k3 estimator (Schulman 2020, "Approximating KL
    divergence"), unbiased and never negative. ``clipped`` is TRL's
    ``(ratio < 1 - eps_low & A < 0) | (ratio > 1 + eps_high & A > 0)``.

    Args:
        logps: (N, T) the policy's per-token log-probabilities, with gradient.
        old_logps: (N, T) those of the policy that sampled the completions; None when this is the only
            update on them (then the ratio is 1 in value and its gradient is the policy gradient).
        advantages: (N,) one per completion.
        mask: (N, T) bool or 0/1, True at completion tokens.
        epsilon_low: Lower clip range.
        epsilon_high: Upper clip range.
        beta: Weight of the KL penalty.
        ref_logps: (N, T) the reference model's, needed when ``beta > 0``.
    """
    if beta and ref_logps is None:
        raise ValueError(f"beta={beta} needs the reference model's log-probabilities (ref_logps)")
    mask = mask.to(torch.bool)
    # padding positions are set to 0 before any exp: a log-probability of -inf there would make inf * 0 = NaN
    # in the forward pass or, through exp's backward, in the gradient
    logps = torch.where(mask, logps, 0.0)
    old_logps = logps.detach() if old_logps is None else torch.where(mask, old_logps.detach(), 0.0)
    a = advantages.to(logps.dtype).unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clamped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * a, clamped * a)
    kl = None
    if beta:
        diff = torch.where(mask, ref_logps.detach(), 0.0) - logps
        kl = torch.where(mask, torch.exp(diff) - diff - 1, 0.0)
        per_token = per_token + beta * kl
    clipped = ((ratio < 1 - epsilon_low) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
    return TokenLoss(torch.where(mask, per_token, 0.0), kl, clipped & mask)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> torch.Tensor:
    """Reduce per-token losses (N, T) to one scalar.

    - ``grpo``: the mean over sequences of each sequence's mean over its tokens (Shao et al. 2024); favours
      short completions' tokens.
    - ``bnpo``: the sum over all tokens / the number of tokens in the batch, every token weighted alike.
    - ``dr_grpo``: the sum over all tokens / ``(N * max_new_tokens)``, a constant that does not depend on the
      lengths sampled (Liu et al. 2025, arXiv 2503.20783).

    A sequence with no token counts as 0 (for grpo it still counts among the N); nothing gives NaN.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    mask = mask.to(torch.bool)
    masked = torch.where(mask, per_token, 0.0)
    if loss_type == "grpo":
        tokens = mask.sum(dim=1).clamp(min=1).to(per_token.dtype)
        return (masked.sum(dim=1) / tokens).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1).to(per_token.dtype)
    return masked.sum() / (per_token.shape[0] * max_new_tokens)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is on (for logging the KL and the clip fraction); 0 when nothing is."""
    mask = mask.to(torch.bool)
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)
