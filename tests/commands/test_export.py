"""Export: the adapter alone loads with peft; the merged model loads with plain transformers and reproduces the
unmerged logits, fully trained groups included; a failed logits check writes nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.commands.test_loading import lora_checkpoint
from vlmtune.cli import main
from vlmtune.commands.export import ExportError, export_checkpoint
from vlmtune.commands.loading import load_eval_data
from vlmtune.config.schema import Config
from vlmtune.data.collate import collate
from vlmtune.eval.alignment import encode, token_ids


def _batch(processor, shapes_dir) -> dict:
    items = load_eval_data(Config(), str(shapes_dir / "compare.jsonl"), processor, 2)
    items += load_eval_data(Config(), str(shapes_dir / "eval.jsonl"), processor, 2)
    pad, image = token_ids(processor)
    batch = collate([encode(processor, it) for it in items], pad_id=pad, image_token_id=image)
    batch.pop("labels")
    return batch


def test_merged_export_loads_with_plain_transformers_and_reproduces_logits(tiny_dir, shapes_dir, tmp_path):
    trained, processor = lora_checkpoint(tiny_dir, tmp_path / "final", projector_full=True)
    report = export_checkpoint(tmp_path / "final", tmp_path / "merged", merge=True)
    assert report.kind == "merged" and report.max_abs_diff <= report.tolerance
    assert not (tmp_path / "merged" / "adapter_config.json").exists()

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    plain_processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    assert plain_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    batch = _batch(plain_processor, shapes_dir)
    with torch.no_grad():
        diff = (model(**batch).logits - trained(**batch).logits).abs().max()
    assert diff < 1e-4
    # the fully trained projector is written in, not the base's
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    assert not torch.equal(model.model.visual.merger.mlp[0].weight, base.model.visual.merger.mlp[0].weight)


def test_adapter_export_loads_with_peft_and_reports_its_size(tiny_dir, tmp_path, capsys):
    from peft import PeftModel

    lora_checkpoint(tiny_dir, tmp_path / "final")
    assert main(["export", "--checkpoint", str(tmp_path / "final"), "--out", str(tmp_path / "adapter")]) == 0
    out = tmp_path / "adapter"
    size = (out / "adapter_model.safetensors").stat().st_size
    assert f"wrote adapter export to {out} ({size / 1e6:.2f} MB of weights)" in capsys.readouterr().out
    for name in (
        "adapter_config.json",
        "chat_template.jinja",
        "tokenizer.json",
        "processor_config.json",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_dir), out)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_failed_logits_check_writes_nothing(tiny_dir, tmp_path):
    lora_checkpoint(tiny_dir, tmp_path / "final")
    with pytest.raises(ExportError, match=r"merged logits differ .* above the tolerance -1; nothing was written"):
        export_checkpoint(tmp_path / "final", tmp_path / "merged", merge=True, atol=-1.0)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.tmp").exists()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--checkpoint", "{tiny}", "--out", "{tmp}/x"], "holds a full model (no group used LoRA), not an adapter"),
        (
            ["--checkpoint", "{tmp}/missing", "--out", "{tmp}/x", "--merge"],
            "checkpoint folder '{tmp}/missing' does not exist",
        ),
    ],
    ids=["full-model-without-merge", "missing-checkpoint"],
)
def test_export_bad_input_exits_2(tiny_dir, tmp_path, capsys, args, fragment):
    fill = {"tiny": str(tiny_dir), "tmp": str(tmp_path)}
    assert main(["export", *[a.format(**fill) for a in args]]) == 2
    assert fragment.format(**fill) in capsys.readouterr().err


@pytest.mark.parametrize(
    "out, fragment",
    [
        ("{run}/final", "'{run}/final' is the checkpoint it is made from"),
        ("{run}/final/merged", "lies inside the checkpoint it is made from"),
        ("{run}", "'{run}' contains the checkpoint it is made from"),
        ("{tmp}", "contains the checkpoint it is made from"),
        ("{run}/exports/merged", "lies inside the run folder '{run}'"),
        ("{other}", "'{other}' is the run folder '{other}'"),
        ("{tmp}/runs_copy", "contains the run folder '{tmp}/runs_copy/other'"),
    ],
    ids=["is-source", "inside-source", "run-around-source", "parent-of-all", "inside-run", "other-run", "holds-a-run"],
)
def test_export_never_writes_over_its_checkpoint_or_a_run_folder(tiny_dir, tmp_path, capsys, out, fragment):
    run = tmp_path / "run"
    lora_checkpoint(tiny_dir, run / "final")
    (run / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    (tmp_path / "runs_copy" / "other").mkdir(parents=True)
    (tmp_path / "runs_copy" / "other" / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    fill = {"run": str(run), "tmp": str(tmp_path), "other": str(other)}
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    rc = main(["export", "--checkpoint", str(run / "final"), "--out", out.format(**fill), "--merge", "--overwrite"])
    assert rc == 2
    assert fragment.format(**fill) in capsys.readouterr().err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing removed, nothing added
