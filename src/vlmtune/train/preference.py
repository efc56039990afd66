"""Preference losses on sequence log-probabilities: the DPO family and KTO, one value per pair or sample.

Written by hand: no library gives these losses per sequence on batches shaped like ours.

Each function takes the summed log-probabilities of an answer's tokens (and how many tokens there were) and
returns per-pair losses for the caller to average, with the implicit rewards to log. The formulas follow the
papers named in each docstring; where a choice is left open (summed or per-token mean log-probabilities), the
choice of TRL's and LLaMA-Factory's trainers is taken and said.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

REFERENCE_FREE = ("orpo", "simpo")
REFERENCE_BASED = ("sigmoid", "robust", "hinge", "ipo")
LOSSES = REFERENCE_BASED + REFERENCE_FREE


@dataclass
class SeqLogps:
    """Per sequence: the summed log-probabilities of its answer tokens, and how many answer tokens it has."""

    sum: torch.Tensor  # (B,) float
    tokens: torch.Tensor  # (B,) float or long, >= 1

    @property
    def mean(self) -> torch.Tensor:
        """Per-token mean log-probability, ``sum / tokens``."""
        return self.sum / self.tokens.to(self.sum.dtype)


@dataclass
class PreferenceLoss:
    """Per-pair losses (averaged by the caller) and the implicit rewards of both answers, detached."""

    losses: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,)
    rejected_rewards: torch.Tensor  # (B,)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for log-probabilities ``x <= 0``, finite at ``x = 0``.

    ``-expm1(x)`` keeps its precision near 0, where ``1 - exp(x)`` would round to 0; the clamp keeps the
    result finite when a mean log-probability is 0 (or rounds above it).
    """
    return torch.log((-torch.expm1(x)).clamp(min=torch.finfo(x.dtype).tiny))


def dpo_family_loss(
    loss: str,
    beta: float,
    chosen: SeqLogps,
    rejected: SeqLogps,
    ref_chosen: SeqLogps | None,
    ref_rejected: SeqLogps | None,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    simpo_gamma: float = 0.5,
) -> PreferenceLoss:
    """One loss of the DPO family per (chosen, rejected) pair.

    With pi the policy, ref the reference, and the log-ratio on summed log-probabilities
    ``h = (pi_c - ref_c) - (pi_r - ref_r)``:

    - ``sigmoid``: ``-(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)``. DPO: Rafailov, Sharma, Mitchell,
      Ermon, Manning, Finn 2023, arXiv 2305.18290; the label smoothing ``eps`` is conservative DPO (Mitchell 2023,
      "A note on DPO with noisy preferences").
    - ``robust``: ``((1 - eps)(-logsigmoid(beta h)) + eps logsigmoid(-beta h)) / (1 - 2 eps)``. Chowdhury,
      Kini, Natarajan 2024, "Provably robust DPO", arXiv 2403.00409.
    - ``hinge``: ``relu(1 - beta h)``. SLiC-HF: Zhao, Joshi, Liu, Khalman, Saleh, Liu 2023, arXiv 2305.10425.
    - ``ipo``: ``(h - 1 / (2 beta))^2`` with h on per-token MEAN log-probabilities (the paper's per-token
      normalisation, as TRL computes it). IPO: Azar, Rowland, Piot, Guo, Calandriello, Valko, Munos 2023,
      arXiv 2310.12036.
    - ``orpo`` (no reference): with mean log-probabilities m_c, m_r,
      ``log_odds = (m_c - log(1 - exp(m_c))) - (m_r - log(1 - exp(m_r)))`` and
      ``loss = -m_c - beta logsigmoid(log_odds)``: the chosen answer's NLL plus beta times the odds-ratio term.
      ORPO: Hong, Lee, Thorne 2024, arXiv 2403.07691.
    - ``simpo`` (no reference): ``-logsigmoid(beta (m_c - m_r) - gamma)``. SimPO: Meng, Xia, Chen 2024,
      arXiv 2405.14734.

    Rewards: ``beta (pi - ref)`` on summed log-probabilities for the reference-based losses (ipo included),
    ``beta m`` for orpo and simpo. ``sft_weight > 0`` adds ``sft_weight * (-m_c)``, the chosen answer's mean
    token NLL, to every loss (LLaMA-Factory's ``pref_ftx``).

    Args:
        loss: One of ``sigmoid``, ``robust``, ``hinge``, ``ipo``, ``orpo``, ``simpo``.
        beta: Temperature of the implicit reward (for orpo, the weight of the odds-ratio term).
        chosen: The policy's log-probabilities of the chosen answers.
        rejected: The policy's log-probabilities of the rejected answers.
        ref_chosen: The reference model's, for the reference-based losses; ignored by orpo and simpo.
        ref_rejected: As ``ref_chosen``, for the rejected answers.
        label_smoothing: ``eps``, the assumed fraction of flipped preferences; sigmoid and robust only,
            in ``[0, 0.5)``.
        sft_weight: Weight of the chosen answer's mean token NLL added to each loss.
        simpo_gamma: SimPO's target reward margin ``gamma``.

    Returns:
        Per-pair losses (B,) and detached rewards of the chosen and rejected answers.

    Raises:
        ValueError: An unknown loss, a reference-based loss without reference log-probabilities, or a label
            smoothing outside ``[0, 0.5)`` or given to a loss that does not use it.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown preference loss {loss!r}; valid: {', '.join(LOSSES)}")
    if label_smoothing and loss not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to the sigmoid and robust losses, not {loss!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    eps = label_smoothing
    m_c, m_r = chosen.mean, rejected.mean

    if loss in REFERENCE_FREE:
        if loss == "orpo":
            log_odds = (m_c - log1mexp(m_c)) - (m_r - log1mexp(m_r))
            losses = -m_c - beta * F.logsigmoid(log_odds)
        else:
            losses = -F.logsigmoid(beta * (m_c - m_r) - simpo_gamma)
        chosen_rewards, rejected_rewards = beta * m_c, beta * m_r
    else:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"the {loss!r} loss needs the reference model's log-probabilities")
        chosen_ratio = chosen.sum - ref_chosen.sum
        rejected_ratio = rejected.sum - ref_rejected.sum
        h = chosen_ratio - rejected_ratio
        if loss == "sigmoid":
            losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        elif loss == "robust":
            losses = ((1 - eps) * -F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
        elif loss == "hinge":
            losses = torch.relu(1 - beta * h)
        else:  # ipo
            h_mean = (m_c - ref_chosen.mean) - (m_r - ref_rejected.mean)
            losses = (h_mean - 1 / (2 * beta)) ** 2
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio

    if sft_weight:
        losses = losses + sft_weight * -m_c
    return PreferenceLoss(losses, chosen_rewards.detach(), rejected_rewards.detach())


def kto_loss(
    beta: float,
    policy: SeqLogps,
    ref: SeqLogps,
    kl: torch.Tensor,
    desirable: torch.Tensor,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO: each answer is judged alone as desirable or undesirable, against a batch reference point.

    With ``r = pi - ref`` on summed log-probabilities and the reference point ``z0 = kl``:
    desirable answers lose ``w_d (1 - sigmoid(beta (r - z0)))``, undesirable ones
    ``w_u (1 - sigmoid(beta (z0 - r)))``. Ethayarajh, Xu, Muennighoff, Jurafsky, Kiela 2024, arXiv 2402.01306,
    in the form TRL's KTO trainer computes.

    Args:
        beta: Temperature of the implicit reward.
        policy: The policy's log-probabilities of each sample's answer.
        ref: The reference model's, for the same answers.
        kl: The reference point z0, a scalar from :func:`kto_reference_point` averaged across processes;
            no gradient flows through it.
        desirable: (B,) bool, True where the answer is desirable.
        desirable_weight: ``w_d``.
        undesirable_weight: ``w_u``.

    Returns:
        Per-sample weighted losses (B,) and the detached rewards ``beta r`` (B,).
    """
    r = policy.sum - ref.sum
    z0 = kl.detach()
    desirable = desirable.to(torch.bool)
    gain = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    loss = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable, gain, loss), (beta * r).detach()


def kto_reference_point(policy_mismatched: SeqLogps, ref_mismatched: SeqLogps) -> torch.Tensor:
    """KTO's reference point z0 on this process: the mean of ``pi - ref`` over mismatched pairs, at least 0.

    The mismatched sequences pair prompt i with the answer of another sample, an estimate of
    KL(pi || ref) as in TRL's KTO trainer (Ethayarajh et al. 2024, arXiv 2402.01306). Detached and clamped
    at 0; the caller averages the value across processes. An empty batch gives 0.
    """
    diff = (policy_mismatched.sum - ref_mismatched.sum).detach()
    if diff.numel() == 0:
        return diff.new_zeros(())
    return diff.mean().clamp(min=0)
