"""The training methods' settings: ``train.dpo``, ``train.kto`` and ``train.grpo`` (``train.method`` picks one).

The formulas are the papers' and TRL's: DPO (Rafailov et al. 2023), IPO (Azar et al. 2023), cDPO and robust DPO
(Chowdhury et al. 2024), ORPO (Hong et al. 2024), SimPO (Meng et al. 2024), KTO (Ethayarajh et al. 2024), GRPO
(Shao et al. 2024), Dr. GRPO (Liu et al. 2025) and DAPO's clip-higher (Yu et al. 2025).
"""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from vlmtune.config.strict import StrictModel

Method = Literal["sft", "dpo", "kto", "grpo"]
METHODS: tuple[str, ...] = get_args(Method)
"""The objectives ``train.method`` names."""

REFERENCE_FREE_LOSSES = ("orpo", "simpo")
"""DPO-family losses that need no reference model."""


class DPOConfig(StrictModel):
    """Preference pairs: the chosen answer made more likely than the rejected one."""

    beta: float = Field(
        0.1,
        gt=0,
        description="sigmoid/ipo/hinge/robust: DPO's beta, the temperature of the implicit reward (larger keeps "
        "closer to the reference); orpo: the odds-ratio weight lambda; simpo: SimPO's beta",
    )
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "orpo", "simpo"] = Field(
        "sigmoid",
        description="sigmoid: DPO's logistic loss; ipo: squared loss toward a margin of 1/(2 beta); hinge: SLiC's "
        "hinge on the reward margin; robust: DPO unbiased under label noise (label_smoothing); orpo: cross-entropy "
        "on the chosen answer plus an odds-ratio term; simpo: length-normalised margin with target simpo_gamma "
        "(orpo and simpo need no reference model)",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="assumed share of pairs whose labels are flipped, for sigmoid (cDPO) and robust; 0 trusts every pair",
    )
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the chosen answers' cross-entropy added to the loss (LLaMA-Factory's pref_ftx); 0 adds none",
    )
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin gamma (loss: simpo)")
    cache_reference: bool = Field(
        True,
        description="compute the reference model's log-probabilities once per training sample and keep them (saved "
        "with the resume state) instead of a reference forward every step; turned off while data.augment is enabled "
        "(the images change each epoch)",
    )


class KTOConfig(StrictModel):
    """Single answers labelled desirable or undesirable (KTO)."""

    beta: float = Field(0.1, gt=0, description="KTO's beta: the temperature of the implicit reward")
    desirable_weight: float = Field(
        1.0, gt=0, description="weight of the desirable answers' loss (LLaMA-Factory's kto_chosen_weight)"
    )
    undesirable_weight: float = Field(
        1.0,
        gt=0,
        description="weight of the undesirable answers' loss (LLaMA-Factory's kto_rejected_weight); raise it when "
        "undesirable answers are fewer, so weight x count is about even",
    )


RewardName = Literal["exact_match", "contains", "format", "length_penalty"]
REWARD_NAMES: tuple[str, ...] = get_args(RewardName)
"""The builtin rewards a ``train.grpo.rewards`` entry can name."""

_FUNCTION_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class RewardSpec(StrictModel):
    """One reward of GRPO's sum: a builtin by name, a regular expression, or a Python function."""

    name: RewardName | None = Field(
        None,
        description="a builtin reward: exact_match (1 when the answer equals the sample's last answer, ignoring case "
        "and spacing; the answer is the text inside <answer>...</answer> when the completion has those tags, else "
        "all of it), contains (1 when the sample's answer appears in it), format (1 when the completion is "
        "<think>...</think><answer>...</answer>, DeepSeek-R1's format), length_penalty (0 up to the reference's "
        "length in words, down to -1 at twice it)",
    )
    regex: str | None = Field(None, description="1 when the answer matches this regular expression (re.search), else 0")
    function: str | None = Field(
        None,
        description="a Python function 'package.module:function' returning one score per completion, imported when "
        "training starts",
    )
    weight: float = Field(1.0, description="this reward's weight in the sum (negative to penalise)")

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        """A bare string in YAML (``- exact_match``) names a builtin reward."""
        return {"name": value} if isinstance(value, str) else value

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"not a valid regular expression ({e})") from None
        return value

    @field_validator("function")
    @classmethod
    def _function_path(cls, value: str | None) -> str | None:
        if value is not None and not _FUNCTION_PATH.match(value):
            raise ValueError(
                "a function is given as 'package.module:function' (a module path, a colon, the function's name)"
            )
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> RewardSpec:
        given = [k for k in ("name", "regex", "function") if getattr(self, k) is not None]
        if len(given) != 1:
            what = {0: "none is given", 2: f"{' and '.join(given)} are both given"}.get(
                len(given), "all three are given"
            )
            raise ValueError(f"a reward is exactly one of name ({', '.join(REWARD_NAMES)}), regex or function; {what}")
        return self

    @property
    def label(self) -> str:
        """The name used in logs: the builtin's name, ``regex:<pattern>`` or the function's path."""
        if self.name is not None:
            return self.name
        return f"regex:{self.regex}" if self.regex is not None else str(self.function)


class GRPOConfig(StrictModel):
    """Rollouts: answers sampled per prompt, scored by rewards, trained toward the better ones of each group."""

    group_size: int = Field(
        4, ge=2, description="completions sampled per prompt; advantages compare the answers of one prompt"
    )
    max_new_tokens: int = Field(16, gt=0, description="longest sampled completion in tokens")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: keep the smallest token set of this mass")
    beta: float = Field(
        0.04, ge=0, description="weight of the KL penalty against the reference model; 0: no reference forward"
    )
    epsilon: float = Field(
        0.2, gt=0, lt=1, description="PPO clip range: the ratio is clipped to [1-epsilon, 1+epsilon]"
    )
    epsilon_high: float | None = Field(
        None, gt=0, description="upper clip range (DAPO's clip-higher): [1-epsilon, 1+epsilon_high]; empty: epsilon"
    )
    loss: Literal["grpo", "dr_grpo", "bnpo"] = Field(
        "grpo",
        description="grpo: token losses averaged per completion, then over completions; dr_grpo: summed and divided "
        "by a constant (max_new_tokens), advantages not divided by their std; bnpo: averaged over every token of "
        "the batch",
    )
    num_iterations: int = Field(
        1,
        ge=1,
        description="optimizer steps per batch of rollouts (PPO epochs); from the second on the policy differs "
        "from the one that sampled, and the clip applies",
    )
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="exact_match")],
        min_length=1,
        description="the rewards summed (each times its weight) to score a completion: a builtin name "
        f"({', '.join(REWARD_NAMES)}), {{regex: PATTERN}}, or {{function: package.module:function}}",
    )
