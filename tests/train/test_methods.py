"""DPO, KTO and GRPO on a real tiny Qwen2-VL with real peft adapters: the reference, the shared image encoding,
the batch layouts and the rollouts (the loss formulas are in test_preference.py and test_policy.py)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate import Accelerator

from vlmtune.checks import inner_model
from vlmtune.config.data import DataConfig
from vlmtune.config.load import load_config
from vlmtune.config.stages import resolve_stages
from vlmtune.data.chat import to_chat
from vlmtune.data.collate import collate
from vlmtune.data.counted import encode_text, image_token_counts
from vlmtune.data.dataset import build_dataset
from vlmtune.data.pairs import ROW_SOURCE, SAMPLE_INDEX
from vlmtune.data.shapes import generate_shapes
from vlmtune.model.build import build_model
from vlmtune.train.dpo import DPO
from vlmtune.train.loader import make_loader
from vlmtune.train.logps import sequence_logps, share_vision_rows
from vlmtune.train.preference import SeqLogps, dpo_family_loss
from vlmtune.train.reference import Reference
from vlmtune.train.rollout import Prompts, collate_prompts, row_seeds, sample

CPU = torch.device("cpu")
GROUPS = {
    "projector": {"mode": "lora", "rank": 4},
    "language_model": {"mode": "lora", "rank": 4, "targets": "attention"},
    "lm_head": {"mode": "full"},
}


def _built(tiny_dir, tmp_path, **train):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": str(tiny_dir)}, "groups": GROUPS, "train": train}))
    cfg = load_config(path, echo=lambda *a: None)
    return build_model(cfg, resolve_stages(cfg), tiny_dir, CPU, echo=lambda *a: None)


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    motion = generate_shapes(out, 4, "motion", seed=6, name="motion")
    pairs = []
    for line in motion.read_text().splitlines():  # the video task as pairs: the right direction and another
        record = json.loads(line)
        right = record["messages"][-1]["content"]
        wrong = "left" if right != "left" else "right"
        pairs.append(
            {
                "messages": record["messages"][:-1],
                "chosen": {"role": "assistant", "content": right},
                "rejected": {"role": "assistant", "content": wrong},
                "videos": record["videos"],
            }
        )
    (out / "video-pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return (
        generate_shapes(out, 6, "color-pairs", seed=3),
        generate_shapes(out, 6, "color-kto", seed=4, name="kto"),
        out / "video-pairs.jsonl",
    )


def _trained(built) -> list[str]:
    return [n for n, p in built.model.named_parameters() if p.requires_grad]


def _perturb(model, seed: int) -> None:
    """Moves every trained tensor, as some optimizer steps would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_the_reference_with_adapters_disabled_is_the_base_model(tiny_dir, tmp_path, compare_batch):
    built = _built(tiny_dir, tmp_path)
    model = built.model
    before = _logits(model, compare_batch)  # fresh LoRA (B = 0): the base model's logits
    reference = Reference.at_stage_start(model, _trained(built))
    assert reference.disable_adapter
    assert reference.saved == {}  # nothing kept: disabled adapters and lm_head's original module are the start
    _perturb(model, 0)
    assert not torch.allclose(_logits(model, compare_batch), before)
    with reference.active():
        assert torch.equal(_logits(model, compare_batch), before)
    assert not torch.allclose(_logits(model, compare_batch), before)  # the policy is back


def test_after_an_earlier_stage_the_reference_is_the_stage_start(tiny_dir, tmp_path, compare_batch):
    built = _built(tiny_dir, tmp_path)
    model = built.model
    _perturb(model, 1)  # an SFT stage trained the adapters
    start = _logits(model, compare_batch)
    reference = Reference.at_stage_start(model, _trained(built))
    assert not reference.disable_adapter
    _perturb(model, 2)
    with reference.active():
        assert torch.equal(_logits(model, compare_batch), start)
    # Resume state: a reference restored from its saved tensors is the same point.
    tensors, meta = reference.state()
    again = Reference.from_state(model, tensors, {k: str(v) for k, v in meta.items()})
    with again.active():
        assert torch.equal(_logits(model, compare_batch), start)


def test_a_fully_trained_group_trained_earlier_is_part_of_the_reference(tiny_dir, tmp_path, compare_batch):
    built = _built(tiny_dir, tmp_path)
    model = built.model
    with torch.no_grad():  # an earlier stage trained only the fully-trained lm_head (its LoRA B are still zero)
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(0.05)
    start = _logits(model, compare_batch)
    reference = Reference.at_stage_start(model, _trained(built))
    assert not reference.disable_adapter  # disabling would bring back lm_head's original weights
    _perturb(model, 5)
    with reference.active():
        assert torch.equal(_logits(model, compare_batch), start)


def _pairs_batch(tiny, path, share: bool, method: str = "dpo") -> dict:
    model, processor = tiny
    ds = build_dataset(str(path), DataConfig(max_length=512), processor, "train", method)
    loader = make_loader(ds, processor, len(ds), False, 0, 0, method=method, share=share)
    return next(iter(loader))


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("media", ["image", "video"])
def test_pairs_in_one_batch_give_the_loss_of_two_separate_forwards(tiny_dir, tmp_path, tiny, pair_data, share, media):
    built = _built(tiny_dir, tmp_path)
    model, processor = built.model, built.processor
    _perturb(model, 3)
    model.eval()
    hook = share_vision_rows(inner_model(model).model)
    try:
        data = pair_data[0] if media == "image" else pair_data[2]
        batch = _pairs_batch((model, processor), data, share)
        n = len(batch[SAMPLE_INDEX])
        assert batch["input_ids"].shape[0] == 2 * n
        assert (ROW_SOURCE in batch) == share and batch[f"{media}_grid_thw"].shape[0] == (n if share else 2 * n)
        objective = DPO(
            SimpleNamespace(loss="sigmoid", beta=0.5, label_smoothing=0.0, sft_weight=0.0, simpo_gamma=0.5), False
        )
        objective.start(model, _trained(built))
        _perturb(model, 4)  # the policy moves away from the reference
        joint = objective.loss(model, batch, Accelerator(cpu=True)).value

        # The same pairs as two batches of single rows, each through the model on its own.
        ds = build_dataset(str(data), DataConfig(max_length=512), processor, "train", "dpo")
        items = [ds[i] for i in range(len(ds))]
        tok = processor.tokenizer
        args = {
            "pad_id": tok.pad_token_id,
            "image_token_id": tok.convert_tokens_to_ids(processor.image_token),
            "video_token_id": tok.convert_tokens_to_ids(processor.video_token),
        }
        clean = [{k: v for k, v in it.items() if k not in ("rejected", SAMPLE_INDEX)} for it in items]
        chosen = collate(clean, **args)
        rejected = collate(
            [
                {**c, "input_ids": it["rejected"]["input_ids"], "labels": it["rejected"]["labels"]}
                for c, it in zip(clean, items)
            ],
            **args,
        )
        with torch.no_grad():
            pc, tc = sequence_logps(model, chosen)
            pr, tr = sequence_logps(model, rejected)
            with objective.reference.active():
                rc, _ = sequence_logps(model, chosen)
                rr, _ = sequence_logps(model, rejected)
        separate = dpo_family_loss(
            "sigmoid", 0.5, SeqLogps(pc, tc), SeqLogps(pr, tr), SeqLogps(rc, tc), SeqLogps(rr, tr)
        ).losses.mean()
    finally:
        hook.remove()
    # Right padding to a wider batch and the shared encoding change float summation order only.
    assert joint.item() == pytest.approx(separate.item(), rel=1e-5, abs=1e-6)


def test_dpo_at_the_stage_start_is_log_2_whatever_beta(tiny_dir, tmp_path, tiny, pair_data):
    built = _built(tiny_dir, tmp_path)
    model = built.model
    for beta in (0.1, 1e-8, 5.0):
        objective = DPO(
            SimpleNamespace(loss="sigmoid", beta=beta, label_smoothing=0.0, sft_weight=0.0, simpo_gamma=0.5), False
        )
        objective.start(model, _trained(built))
        batch = _pairs_batch((model, built.processor), pair_data[0], share=False)
        model.eval()
        assert objective.loss(model, batch, Accelerator(cpu=True)).value.item() == pytest.approx(math.log(2), abs=1e-6)


def test_kto_mismatched_rows_are_the_conversations_they_stand_for(tiny, pair_data):
    _, processor = tiny
    ds = build_dataset(str(pair_data[1]), DataConfig(max_length=512), processor, "train", "kto")
    batch = _pairs_batch(tiny, pair_data[1], share=True, method="kto")
    n = len(ds)
    assert batch["kto_label"].tolist() == [bool(s.kto_label) for s in ds.samples()]
    for i in range(n):
        j = (i + 1) % n
        # Prompt i with answer j, encoded from scratch as a conversation (one image, same size: same tokens).
        si, sj = ds.samples()[i], ds.samples()[j]
        joined = replace(si, messages=[*si.messages[:-1], sj.messages[-1]])
        counts = image_token_counts(processor, ds.items[i].sizes, None, None)
        want = encode_text(processor, to_chat(joined), counts).input_ids
        row = batch["input_ids"][n + i][batch["attention_mask"][n + i].bool()].tolist()
        assert row == want


def test_a_completion_does_not_depend_on_the_rows_beside_it(tiny, shapes_dir):
    model, processor = tiny
    ds = Prompts(build_dataset(str(shapes_dir / "eval.jsonl"), DataConfig(max_length=512), processor, "eval", "grpo"))
    cfg = SimpleNamespace(group_size=3, max_new_tokens=6, temperature=1.0, top_p=0.9)
    both = collate_prompts([ds[0], ds[1]])
    alone = collate_prompts([ds[1]])
    seeds = row_seeds(5, 2, [0, 1], 3)
    a = sample(model, processor, both, cfg, seeds)
    b = sample(model, processor, alone, cfg, seeds[3:])
    assert a.completions[3:] == b.completions
    again = sample(model, processor, both, cfg, seeds)
    assert again.completions == a.completions  # same seeds, same draws
    other = sample(model, processor, both, cfg, row_seeds(6, 2, [0, 1], 3))
    assert other.completions != a.completions
