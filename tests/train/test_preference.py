"""DPO-family and KTO losses against values worked out by hand with math, on fixed log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from vlmtune.train.preference import SeqLogps, dpo_family_loss, kto_loss, kto_reference_point


def logps(sums, tokens):
    return SeqLogps(torch.tensor(sums, dtype=torch.float64), torch.tensor(tokens))


def softplus(x):  # -logsigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


# Pair 0: pi_c = -4 (2 tokens, mean -2), pi_r = -9 (3 tokens, mean -3), ref_c = -5 (mean -2.5), ref_r = -8 (mean -8/3)
#   h = (-4 + 5) - (-9 + 8) = 1 + 1 = 2
# Pair 1: the same pair with chosen and rejected swapped, so h = -2 (only where the answers' lengths do not matter)
CHOSEN = logps([-4.0, -9.0], [2, 3])
REJECTED = logps([-9.0, -4.0], [3, 2])
REF_CHOSEN = logps([-5.0, -8.0], [2, 3])
REF_REJECTED = logps([-8.0, -5.0], [3, 2])


def loss(name, beta, **kw):
    return dpo_family_loss(name, beta, CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, **kw)


def close(tensor, expected):
    assert tensor.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_sigmoid_dpo_by_hand():
    # beta h = 0.5 * 2 = 1: -logsigmoid(1) = log(1 + e^-1) = 0.3132617; the swapped pair log(1 + e^1) = 1.3132617
    out = loss("sigmoid", 0.5)
    close(out.losses, [softplus(-1.0), softplus(1.0)])
    assert out.losses[0].item() == pytest.approx(0.31326168751822286)
    # rewards: beta (pi - ref) on sums: 0.5 * (-4 + 5) = 0.5 and 0.5 * (-9 + 8) = -0.5
    close(out.chosen_rewards, [0.5, -0.5])
    close(out.rejected_rewards, [-0.5, 0.5])


def test_sigmoid_with_label_smoothing_by_hand():
    # -(0.9) logsigmoid(1) - 0.1 logsigmoid(-1) = 0.9 log(1 + e^-1) + 0.1 log(1 + e) = log(1 + e^-1) + 0.1 = 0.4132617
    out = loss("sigmoid", 0.5, label_smoothing=0.1)
    assert out.losses[0].item() == pytest.approx(0.9 * softplus(-1.0) + 0.1 * softplus(1.0), rel=1e-12)
    assert out.losses[0].item() == pytest.approx(0.41326168751822286, rel=1e-12)


def test_robust_by_hand_and_equal_to_sigmoid_without_smoothing():
    # ((0.9)(log(1 + e^-1)) + 0.1 logsigmoid(-1)) / 0.8 = (0.9 L - 0.1 (1 + L)) / 0.8 = L - 0.125, L = log(1 + e^-1)
    out = loss("robust", 0.5, label_smoothing=0.1)
    assert out.losses[0].item() == pytest.approx(softplus(-1.0) - 0.125, rel=1e-12)
    assert out.losses[0].item() == pytest.approx(0.18826168751822286, rel=1e-12)
    assert torch.equal(loss("robust", 0.5).losses, loss("sigmoid", 0.5).losses)


def test_hinge_by_hand():
    # relu(1 - beta h): beta 0.25 -> 1 - 0.5 = 0.5 and 1 + 0.5 = 1.5; beta 0.5 -> 1 - 1 = 0 (the margin is met)
    close(loss("hinge", 0.25).losses, [0.5, 1.5])
    assert loss("hinge", 0.5).losses[0].item() == 0.0


def test_ipo_uses_mean_logps_and_rewards_use_sums():
    # mean h = (-2 + 2.5) - (-3 + 8/3) = 0.5 + 1/3 = 5/6; beta 0.5 -> 1 / (2 beta) = 1; (5/6 - 1)^2 = 1/36
    out = loss("ipo", 0.5)
    assert out.losses[0].item() == pytest.approx(1 / 36, rel=1e-12)
    # the swapped pair: mean h = (-3 + 8/3) - (-2 + 2.5) = -5/6; (-5/6 - 1)^2 = 121/36
    assert out.losses[1].item() == pytest.approx(121 / 36, rel=1e-12)
    close(out.chosen_rewards, [0.5, -0.5])  # sums, as for sigmoid


def test_orpo_by_hand():
    # m_c = -2, m_r = -3; log_odds = (-2 - log(1 - e^-2)) - (-3 - log(1 - e^-3))
    #   = (-2 + 0.1454135) - (-3 + 0.0510692) = 1.0943443
    # loss = -m_c - beta logsigmoid(log_odds) = 2 + 0.5 log(1 + e^-1.0943443) = 2 + 0.5 * 0.2887508 = 2.1443754
    log_odds = (-2 - math.log(1 - math.exp(-2))) - (-3 - math.log(1 - math.exp(-3)))
    assert log_odds == pytest.approx(1.0943443, abs=1e-7)
    out = dpo_family_loss("orpo", 0.5, CHOSEN, REJECTED, None, None)
    assert out.losses[0].item() == pytest.approx(2 + 0.5 * softplus(-log_odds), rel=1e-12)
    assert out.losses[0].item() == pytest.approx(2.1443754, abs=1e-7)
    close(out.chosen_rewards, [0.5 * -2, 0.5 * -3])  # beta * mean logps
    close(out.rejected_rewards, [0.5 * -3, 0.5 * -2])


def test_simpo_by_hand():
    # beta (m_c - m_r) - gamma = 2 * (-2 + 3) - 0.5 = 1.5; -logsigmoid(1.5) = log(1 + e^-1.5) = 0.2014133
    out = dpo_family_loss("simpo", 2.0, CHOSEN, REJECTED, None, None, simpo_gamma=0.5)
    assert out.losses[0].item() == pytest.approx(softplus(-1.5), rel=1e-12)
    assert out.losses[0].item() == pytest.approx(0.2014132779827524, rel=1e-12)
    # the swapped pair: 2 * (-3 + 2) - 0.5 = -2.5; log(1 + e^2.5)
    assert out.losses[1].item() == pytest.approx(softplus(2.5), rel=1e-12)
    close(out.chosen_rewards, [-4.0, -6.0])
    close(out.rejected_rewards, [-6.0, -4.0])


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_reference_free_losses_ignore_the_reference(name):
    without = dpo_family_loss(name, 0.5, CHOSEN, REJECTED, None, None)
    other = logps([-1.0, -50.0], [1, 7])
    with_ref = dpo_family_loss(name, 0.5, CHOSEN, REJECTED, other, other)
    assert torch.equal(without.losses, with_ref.losses)
    assert torch.equal(without.chosen_rewards, with_ref.chosen_rewards)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
def test_sigmoid_with_policy_equal_to_reference_is_log_2(beta):
    out = dpo_family_loss("sigmoid", beta, CHOSEN, REJECTED, CHOSEN, REJECTED)
    close(out.losses, [math.log(2)] * 2)
    close(out.chosen_rewards, [0.0, 0.0])


def test_sigmoid_as_beta_goes_to_zero_is_log_2():
    # beta h = 1e-8 * 2: log(1 + e^-2e-8) = log 2 - 1e-8
    out = loss("sigmoid", 1e-8)
    assert out.losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)


def test_sft_weight_adds_the_chosen_mean_nll():
    # + 0.1 * (-m_c): pair 0 -> + 0.1 * 2 = 0.2; pair 1 (chosen mean -3) -> + 0.3
    base, with_sft = loss("sigmoid", 0.5), loss("sigmoid", 0.5, sft_weight=0.1)
    close(with_sft.losses - base.losses, [0.2, 0.3])
    assert torch.equal(with_sft.chosen_rewards, base.chosen_rewards)


def test_rewards_are_detached_and_losses_carry_gradient():
    pi_c = SeqLogps(torch.tensor([-4.0], requires_grad=True), torch.tensor([2]))
    out = dpo_family_loss("sigmoid", 0.5, pi_c, logps([-9.0], [3]), logps([-5.0], [2]), logps([-8.0], [3]))
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    # d/dpi_c of -logsigmoid(beta h) = -beta sigmoid(-beta h) = -0.5 / (1 + e)
    assert pi_c.sum.grad.item() == pytest.approx(-0.5 / (1 + math.e), rel=1e-6)


def test_orpo_stays_finite_when_a_mean_logp_is_zero():
    chosen = SeqLogps(torch.tensor([0.0, -1e-12], requires_grad=True), torch.tensor([1, 1]))
    out = dpo_family_loss("orpo", 0.1, chosen, logps([-3.0, -3.0], [1, 1]), None, None)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(chosen.sum.grad).all()


@pytest.mark.parametrize("name", ["sigmoid", "robust", "hinge", "ipo"])
def test_reference_based_loss_without_reference_names_the_loss(name):
    with pytest.raises(ValueError, match=name):
        dpo_family_loss(name, 0.1, CHOSEN, REJECTED, None, None)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown preference loss 'dpo'.*sigmoid"):
        loss("dpo", 0.1)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        loss("robust", 0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing.*'hinge'"):
        loss("hinge", 0.1, label_smoothing=0.1)


# KTO. policy sums [-4, -6], ref sums [-5, -5] -> r = [1, -1]; beta 0.5; reference point z0 = 0.4
POLICY = logps([-4.0, -6.0], [2, 2])
REF = logps([-5.0, -5.0], [2, 2])
Z0 = torch.tensor(0.4, dtype=torch.float64)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_kto_by_hand():
    # desirable r = 1: 1 - sigmoid(0.5 (1 - 0.4)) = 1 - sigmoid(0.3) = 0.4255575
    # undesirable r = -1: 1 - sigmoid(0.5 (0.4 + 1)) = 1 - sigmoid(0.7) = 0.3318122
    losses, rewards = kto_loss(0.5, POLICY, REF, Z0, torch.tensor([True, False]))
    close(losses, [1 - sigmoid(0.3), 1 - sigmoid(0.7)])
    assert losses.tolist() == pytest.approx([0.4255574832, 0.3318122278], abs=1e-9)
    close(rewards, [0.5, -0.5])
    assert not rewards.requires_grad
    # the same answers judged the other way: r = 1 undesirable -> 1 - sigmoid(0.5 (0.4 - 1)) = 1 - sigmoid(-0.3)
    # and r = -1 desirable -> 1 - sigmoid(0.5 (-1 - 0.4)) = 1 - sigmoid(-0.7)
    flipped, _ = kto_loss(0.5, POLICY, REF, Z0, torch.tensor([0, 1]))
    close(flipped, [1 - sigmoid(-0.3), 1 - sigmoid(-0.7)])


def test_kto_weights_scale_each_kind():
    losses, _ = kto_loss(
        0.5, POLICY, REF, Z0, torch.tensor([True, False]), desirable_weight=2.0, undesirable_weight=0.5
    )
    close(losses, [2 * (1 - sigmoid(0.3)), 0.5 * (1 - sigmoid(0.7))])


def test_kto_reference_point_gets_no_gradient():
    policy = SeqLogps(torch.tensor([-4.0, -6.0], requires_grad=True), torch.tensor([2, 2]))
    z0 = torch.tensor(0.4, requires_grad=True)
    losses, _ = kto_loss(0.5, policy, logps([-5.0, -5.0], [2, 2]), z0, torch.tensor([True, False]))
    losses.sum().backward()
    assert z0.grad is None and policy.sum.grad is not None


def test_kto_reference_point_mean_and_clamp():
    # diffs [-3 + 4, -5 + 5.5] = [1, 0.5] -> 0.75
    point = kto_reference_point(logps([-3.0, -5.0], [1, 1]), logps([-4.0, -5.5], [1, 1]))
    assert point.item() == 0.75 and point.dim() == 0
    # diffs [1, -2] -> mean -0.5 -> clamped to 0
    assert kto_reference_point(logps([-3.0, -7.0], [1, 1]), logps([-4.0, -5.0], [1, 1])).item() == 0.0
    with_grad = SeqLogps(torch.tensor([-3.0], requires_grad=True), torch.tensor([1]))
    assert not kto_reference_point(with_grad, logps([-4.0], [1])).requires_grad
    assert kto_reference_point(logps([], []), logps([], [])).item() == 0.0


def test_seq_logps_mean():
    assert SeqLogps(torch.tensor([-6.0, -1.0]), torch.tensor([3, 4])).mean.tolist() == [-2.0, -0.25]
