"""What a sample is (an SFT conversation, a preference pair, a KTO-labelled answer) and what each training method
needs of it: a DPO sample needs a rejected answer, a KTO sample a label; SFT and GRPO read neither, so data that
carries one for them is refused rather than trained as something it is not."""

from __future__ import annotations

from vlmtune.data.sharegpt import Problem, Sample

SAMPLE_KINDS = ("sft", "pair", "labelled")
"""What a sample holds: one answer (sft), a chosen and a rejected answer (pair), one answer with a KTO label."""


def sample_kind(sample: Sample) -> str:
    """'pair' (a rejected answer beside the last one), 'labelled' (a KTO label) or 'sft' (one answer)."""
    if sample.rejected is not None:
        return "pair"
    return "labelled" if sample.kto_label is not None else "sft"


def _label(sample: Sample) -> str:
    return "desirable" if sample.kto_label else "undesirable"


def method_problems(sample: Sample, method: str) -> list[Problem]:
    """What ``sample`` lacks, or carries that would be ignored, for training with ``method`` (sft, dpo, kto, grpo).

    Raises:
        ValueError: ``method`` is not one of sft, dpo, kto, grpo.
    """
    kind = sample_kind(sample)

    def problem(what: str, message: str) -> list[Problem]:
        return [Problem(sample.where, what, message)]

    if method == "sft":
        if kind == "labelled":
            return problem(
                "labelled data",
                f"a KTO-labelled answer (kto_tag: {_label(sample)}); SFT would train the undesirable answers too; "
                "train it with method: kto",
            )
        return []  # a pair trains its chosen answer
    if method == "dpo":
        if kind == "sft":
            return problem(
                "not a pair",
                "no rejected answer: method dpo trains preference pairs (the last turn is the chosen answer, "
                "'rejected' the other); give 'chosen' and 'rejected' answers, or train this data with method: sft",
            )
        if kind == "labelled":
            return problem(
                "not a pair",
                f"a KTO-labelled answer (kto_tag: {_label(sample)}), not a pair of chosen and rejected answers: "
                "train it with method: kto",
            )
        if sample.rejected.strip() == sample.messages[-1][1].strip():
            return problem(
                "same answers",
                "the chosen and rejected answers are the same text, so the pair adds nothing to the preference "
                "loss; give two different answers or drop the pair",
            )
        return []
    if method == "kto":
        if kind == "sft":
            return problem(
                "no label",
                "no KTO label: method kto trains answers labelled desirable (true) or undesirable (false); give "
                "each record a kto_tag (TRL: label), or train this data with method: sft",
            )
        if kind == "pair":
            return problem(
                "no label",
                "a preference pair (chosen and rejected answers), not an answer labelled desirable or "
                "undesirable: train pairs with method: dpo, or give one answer with a kto_tag",
            )
        return []
    if method == "grpo":
        why = "GRPO scores sampled answers against the sample's last answer"
        if kind == "labelled":
            return problem(
                "labelled data",
                f"a KTO-labelled answer (kto_tag: {_label(sample)}); {why}, so the label would be ignored (and an "
                "undesirable answer taken as the one to match): train it with method: kto, or drop the label",
            )
        if kind == "pair":
            return problem(
                "pair data",
                f"a preference pair; {why}, so the rejected answer would be ignored: train pairs with method: dpo, "
                "or drop 'rejected'",
            )
        return []
    raise ValueError(f"method '{method}' is not one of sft, dpo, kto, grpo")
