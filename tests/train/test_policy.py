"""GRPO pieces against hand-computed values: advantages, the clipped token loss, the k3 KL and the reductions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vlmtune.train.policy import aggregate, clipped_token_loss, group_advantages, masked_mean


def test_equal_rewards_give_exactly_zero():
    # 0.1 and 0.7 are not exact in binary: their float32 mean can differ from them in the last bit
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=torch.float32)
    for scale in (True, False):
        advantages = group_advantages(rewards, 3, scale=scale)
        assert advantages.tolist() == [0.0] * 6
        assert not advantages.isnan().any()


def test_a_known_group():
    # group 0 = [1, 0, 0, 1]: mean 0.5, deviations [0.5, -0.5, -0.5, 0.5],
    #   unbiased std sqrt((4 * 0.25) / 3) = sqrt(1/3) = 0.5773503; A = +-0.5 / (0.5773503 + 1e-4) = +-0.8658754
    # group 1 = [2, 2, 2, 2]: all equal -> 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert group_advantages(rewards, 4).tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0], rel=1e-12)
    assert a == pytest.approx(0.8658754, abs=1e-7)
    # Dr. GRPO: no division
    assert group_advantages(rewards, 4, scale=False).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]


def test_group_of_two_by_hand():
    # [3, 1]: mean 2, deviations [1, -1], unbiased std sqrt(2), eps 0 -> [1/sqrt(2), -1/sqrt(2)]
    out = group_advantages(torch.tensor([3.0, 1.0], dtype=torch.float64), 2, eps=0.0)
    assert out.tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2)], rel=1e-12)


def test_bad_groups():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match=r"groups \* 3"):
        group_advantages(torch.zeros(4), 3)


@given(
    st.integers(2, 6).flatmap(
        lambda g: st.tuples(st.just(g), st.lists(st.floats(-10, 10), min_size=g, max_size=4 * g))
    ),
    st.floats(-100, 100),
)
def test_advantages_sum_to_zero_per_group_and_ignore_a_shift(case, shift):
    group_size, values = case
    values = values[: len(values) - len(values) % group_size]
    rewards = torch.tensor(values, dtype=torch.float64)
    for scale in (True, False):
        advantages = group_advantages(rewards, group_size, scale=scale)
        sums = advantages.view(-1, group_size).sum(dim=1)
        assert sums.abs().max().item() < 1e-6
        shifted = group_advantages(rewards + shift, group_size, scale=scale)
        assert torch.allclose(shifted, advantages, atol=1e-6)


def test_ratio_one_gives_minus_a_per_token_and_the_policy_gradient():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = torch.tensor([0.5, -2.0])
    out = clipped_token_loss(logps, None, advantages, mask, 0.2, 0.28)
    assert out.per_token.tolist() == [[-0.5, -0.5, 0.0], [2.0, 2.0, 2.0]]
    assert not out.clipped.any() and out.kl is None
    out.per_token.sum().backward()
    # d/dlogps of -(ratio A) at ratio 1 is -A; padding gets none
    assert logps.grad.tolist() == [[-0.5, -0.5, 0.0], [2.0, 2.0, 2.0]]
    same = clipped_token_loss(logps, logps.detach(), advantages, mask, 0.2, 0.28)
    assert torch.equal(same.per_token, out.per_token)


def test_clipping_by_hand():
    # ratios [1.5, 0.5, 1.1] per row, eps_low 0.2 -> [0.8, 1.28] with eps_high 0.28
    # A = +1: min(1.5, 1.28) = 1.28 (clipped); min(0.5, 0.8) = 0.5; min(1.1, 1.1) = 1.1  -> losses negated
    # A = -1: min(-1.5, -1.28) = -1.5; min(-0.5, -0.8) = -0.8 (clipped); -1.1
    old = torch.full((2, 3), -1.0, dtype=torch.float64)
    logps = (old + torch.log(torch.tensor([1.5, 0.5, 1.1], dtype=torch.float64))).requires_grad_()
    out = clipped_token_loss(logps, old, torch.tensor([1.0, -1.0]), torch.ones(2, 3, dtype=torch.bool), 0.2, 0.28)
    assert out.per_token.flatten().tolist() == pytest.approx([-1.28, -0.5, -1.1, 1.5, 0.8, 1.1], rel=1e-12)
    assert out.clipped.tolist() == [[True, False, False], [False, True, False]]
    out.per_token.sum().backward()
    # clipped tokens get no gradient; the others -A * ratio
    assert logps.grad.flatten().tolist() == pytest.approx([0.0, -0.5, -1.1, 1.5, 0.0, 1.1], rel=1e-12)


def test_k3_kl_by_hand():
    # ref - logps = 1 -> e - 1 - 1 = 0.7182818; -1 -> e^-1 + 1 - 1 = 0.3678794; 0 -> 0; padding -> 0
    logps = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    ref = torch.tensor([[0.0, -2.0, -1.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    out = clipped_token_loss(logps, None, torch.zeros(1), mask, 0.2, 0.2, beta=0.1, ref_logps=ref)
    assert out.kl[0].tolist() == pytest.approx([math.e - 2, math.exp(-1), 0.0, 0.0], rel=1e-12)
    # A = 0, ratio 1: the loss is beta * kl alone
    assert out.per_token[0].tolist() == pytest.approx([0.1 * (math.e - 2), 0.1 * math.exp(-1), 0.0, 0.0], rel=1e-12)


def test_k3_kl_is_never_negative():
    generator = torch.Generator().manual_seed(0)
    logps = -torch.rand(8, 16, generator=generator, dtype=torch.float64) * 5
    ref = -torch.rand(8, 16, generator=generator, dtype=torch.float64) * 5
    out = clipped_token_loss(logps, None, torch.zeros(8), torch.ones(8, 16), 0.2, 0.2, beta=1.0, ref_logps=ref)
    assert (out.kl >= 0).all() and (out.kl > 0).any()
    same = clipped_token_loss(logps, None, torch.zeros(8), torch.ones(8, 16), 0.2, 0.2, beta=1.0, ref_logps=logps)
    assert (same.kl == 0).all()


def test_padding_with_minus_inf_stays_finite():
    logps = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    ref = torch.tensor([[-1.5, float("-inf")]])
    out = clipped_token_loss(logps, logps.detach(), torch.ones(1), torch.tensor([[1, 0]]), 0.2, 0.2, 0.1, ref)
    aggregate(out.per_token, torch.tensor([[1, 0]]), "bnpo", 2).backward()
    assert torch.isfinite(out.per_token).all() and torch.isfinite(logps.grad).all()


def test_beta_without_reference_raises():
    with pytest.raises(ValueError, match="ref_logps"):
        clipped_token_loss(torch.zeros(1, 2), None, torch.zeros(1), torch.ones(1, 2), 0.2, 0.2, beta=0.04)


# rows: [1, 2, 3 | pad] (3 tokens, sum 6, mean 2), [4 | pad pad pad] (1 token, sum 4, mean 4), [no tokens]
NAN = float("nan")
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, NAN, 99.0, 99.0], [NAN, 7.0, 7.0, 7.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    ("loss_type", "max_new_tokens", "expected"),
    [
        ("grpo", 4, (2 + 4 + 0) / 3),  # mean of per-sequence means; the empty one counts as 0
        ("bnpo", 4, (6 + 4) / 4),  # all tokens alike
        ("dr_grpo", 4, (6 + 4) / (3 * 4)),  # N * max_new_tokens
        ("dr_grpo", 5, (6 + 4) / (3 * 5)),
    ],
)
def test_aggregate_by_hand(loss_type, max_new_tokens, expected):
    assert aggregate(PER_TOKEN, MASK, loss_type, max_new_tokens).item() == pytest.approx(expected, rel=1e-6)


def test_aggregate_of_no_tokens_is_zero():
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        assert aggregate(PER_TOKEN, torch.zeros_like(MASK), loss_type, 4).item() == 0.0
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
        aggregate(PER_TOKEN, MASK, "ppo", 4)


def test_masked_mean():
    assert masked_mean(PER_TOKEN, MASK).item() == pytest.approx(10 / 4)
    assert masked_mean(PER_TOKEN, torch.zeros_like(MASK)).item() == 0.0
    clipped = torch.tensor([[True, False, True], [False, False, True]])
    assert masked_mean(clipped, torch.tensor([[1, 1, 1], [1, 1, 0]])).item() == pytest.approx(2 / 5)
