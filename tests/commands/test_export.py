"""Export: the adapter alone loads with peft; the merged model loads with plain transformers and reproduces the
unmerged logits, fully trained groups included; the vLLM export is a base with everything but the language model's LoRA
merged in and an adapter of that LoRA alone, which together reproduce the checkpoint's logits; a failed logits check
writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.commands.test_loading import lora_checkpoint
from vlmtune.cli import main
from vlmtune.commands.export import ExportError, export_checkpoint
from vlmtune.commands.loading import load_checkpoint, load_eval_data
from vlmtune.config.schema import Config
from vlmtune.data.collate import collate
from vlmtune.eval.alignment import encode, token_ids

ROOT = Path(__file__).resolve().parents[2]


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
        (
            ["--checkpoint", "{tiny}", "--out", "{tmp}/x", "--merge", "--format", "vllm"],
            "--merge means --format merged; it cannot be combined with --format vllm",
        ),
    ],
    ids=["full-model-without-merge", "missing-checkpoint", "merge-with-vllm"],
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


# --- --format vllm: base/ with everything but the language model's LoRA merged in, adapter/ with that LoRA ---

ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.fixture(scope="module")
def trained_run(tiny_dir, shapes_dir, tmp_path_factory) -> Path:
    """A real two-step training run mixing projector LoRA (rank 16), language-model attention LoRA (rank 8, alpha 32)
    and a fully trained lm_head."""
    out = tmp_path_factory.mktemp("vllm-run") / "run"
    args = [
        "train",
        str(ROOT / "examples/quickstart.yaml"),
        f"model.path={tiny_dir}",
        f"data.train={shapes_dir / 'train.jsonl'}",
        "data.eval=null",
        "groups.projector.mode=lora",
        "groups.projector.rank=16",
        "groups.projector.alpha=32",
        "groups.projector.targets=all-linear",
        "groups.language_model.rank=8",
        "groups.language_model.alpha=32",
        "groups.lm_head.mode=full",
        f"train.output_dir={out}",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.warmup_steps=0",
        "train.progress_bar=false",
    ]
    assert main(args) == 0
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """A model folder's weights under the names of the loaded model (transformers saves Qwen2-VL's original ones)."""
    return AutoModelForImageTextToText.from_pretrained(folder).state_dict()


def _adapter_targets(adapter: Path) -> tuple[dict, set[str]]:
    """(adapter_config.json, module names of the tensors in adapter_model.safetensors as vLLM parses them)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    return config, {k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in keys}


@pytest.mark.slow
def test_vllm_export_of_a_trained_run_splits_base_and_language_model_adapter(
    trained_run, tiny_dir, shapes_dir, tmp_path, capsys
):
    from peft import PeftModel

    out = tmp_path / "vllm"
    assert main(["export", "--checkpoint", str(trained_run / "final"), "--out", str(out), "--format", "vllm"]) == 0
    printed = capsys.readouterr().out
    assert "logits check (plain transformers + peft reload vs. unmerged, float32)" in printed
    assert f"vllm serve {out / 'base'} --enable-lora --lora-modules vllm={out / 'adapter'} --max-lora-rank 8" in printed
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "base"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (out / "base" / name).is_file(), name

    # what vLLM's PEFTHelper and LoRAModel.from_local_checkpoint read: one r and alpha, no modules_to_save, and
    # only the language model's linear layers
    config, modules = _adapter_targets(out / "adapter")
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (8, 32, {}, {})
    assert config["modules_to_save"] is None and not config["use_dora"] and config["bias"] == "none"
    expected = {f"model.language_model.layers.{i}.self_attn.{leaf}" for i in range(2) for leaf in ATTENTION}
    assert set(config["target_modules"]) == modules == expected
    assert config["base_model_name_or_path"] == str((out / "base").resolve())

    # loaded with plain transformers + peft, the export gives the training checkpoint's logits
    trained, processor, _ = load_checkpoint(trained_run / "final")
    base = AutoModelForImageTextToText.from_pretrained(out / "base").eval()
    batch = _batch(AutoProcessor.from_pretrained(out / "base"), shapes_dir)
    with torch.no_grad():
        expected_logits = trained(**batch).logits
        assert (base(**batch).logits - expected_logits).abs().max() > 1e-3  # base/ alone lacks the adapter
        served = PeftModel.from_pretrained(base, out / "adapter").eval()
        assert (served(**batch).logits - expected_logits).abs().max() < 1e-4
    # the projector's LoRA and the fully trained lm_head are in base/; the language model's LoRA is not
    original, written = _weights(tiny_dir), _weights(out / "base")
    assert not torch.equal(written["model.visual.merger.mlp.0.weight"], original["model.visual.merger.mlp.0.weight"])
    assert not torch.equal(written["lm_head.weight"], original["lm_head.weight"])
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(written[q], original[q])


VLLM_CASES = [
    # name, groups, the adapter's module leaves (None: no adapter/), groups whose base weights change
    ("projector-lora-only", {"language_model": {"mode": "frozen"}}, None, ["model.visual.merger.mlp.0"]),
    (
        "vision-tower-lora",
        {
            "vision_tower": {"mode": "lora", "rank": 4, "targets": "all-linear"},
            "projector": {"mode": "frozen"},
            "language_model": {"targets": "all-linear", "rank": 8},
        },
        ATTENTION | {"gate_proj", "up_proj", "down_proj"},
        ["model.visual.blocks.0.attn.qkv", "model.visual.blocks.1.mlp.fc2"],
    ),
]


@pytest.mark.parametrize("groups,leaves,merged", [c[1:] for c in VLLM_CASES], ids=[c[0] for c in VLLM_CASES])
def test_vllm_export_merges_every_lora_outside_the_language_model(tiny_dir, tmp_path, groups, leaves, merged):
    lora_checkpoint(tiny_dir, tmp_path / "final", groups=groups)
    report = export_checkpoint(tmp_path / "final", tmp_path / "vllm", kind="vllm")
    assert report.kind == "vllm" and report.max_abs_diff <= report.tolerance
    original, written = _weights(tiny_dir), _weights(tmp_path / "vllm" / "base")
    for module in merged:
        assert not torch.equal(written[f"{module}.weight"], original[f"{module}.weight"]), module
    if leaves is None:
        assert sorted(p.name for p in (tmp_path / "vllm").iterdir()) == ["base"]
        assert report.serve == f"vllm serve {tmp_path / 'vllm' / 'base'}"
        assert any("the language model has no LoRA" in line for line in report.lines())
        return
    config, modules = _adapter_targets(tmp_path / "vllm" / "adapter")
    assert set(config["target_modules"]) == modules
    assert all(m.startswith("model.language_model.layers.") for m in modules)
    assert {m.rsplit(".", 1)[1] for m in modules} == leaves
    assert config["r"] == 8 and config["modules_to_save"] is None


def test_failed_vllm_logits_check_writes_nothing(tiny_dir, tmp_path):
    lora_checkpoint(tiny_dir, tmp_path / "final")
    with pytest.raises(ExportError, match=r"\(base/ \+ adapter/\) logits differ .* tolerance -1; nothing was written"):
        export_checkpoint(tmp_path / "final", tmp_path / "vllm", atol=-1.0, kind="vllm")
    assert not (tmp_path / "vllm").exists() and not (tmp_path / "vllm.tmp").exists()


def test_a_run_folder_exports_its_final_checkpoint(tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    lora_checkpoint(tiny_dir, run / "final")
    (run / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_groups_with_different_lora_variants_export_merged_and_as_adapters(tiny_dir, shapes_dir, tmp_path):
    # DoRA on the language model, plain LoRA on the projector: two peft adapters, merged together
    trained, processor = lora_checkpoint(tiny_dir, tmp_path / "final", groups={"language_model": {"dora": True}})
    assert (tmp_path / "final" / "language_model_lora" / "adapter_model.safetensors").is_file()
    report = export_checkpoint(tmp_path / "final", tmp_path / "merged", merge=True)
    assert report.max_abs_diff <= report.tolerance
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    batch = _batch(processor, shapes_dir)
    with torch.no_grad():
        assert (merged(**batch).logits - trained(**batch).logits).abs().max() < 1e-4
    # the adapter export keeps the language model's adapter in its sub-folder and counts it
    report = export_checkpoint(tmp_path / "final", tmp_path / "adapter")
    files = [tmp_path / "adapter" / "adapter_model.safetensors", *(tmp_path / "adapter").glob("*/*.safetensors")]
    assert len(files) == 2 and report.weight_bytes == sum(f.stat().st_size for f in files)
    # vLLM serves no DoRA adapter
    with pytest.raises(ExportError, match=r"uses DoRA \(groups.language_model.dora\), which vLLM refuses"):
        export_checkpoint(tmp_path / "final", tmp_path / "vllm", kind="vllm")


def test_vllm_export_of_a_language_model_in_an_adapter_of_its_own(tiny_dir, tmp_path):
    lora_checkpoint(tiny_dir, tmp_path / "final", groups={"language_model": {"rslora": True, "rank": 8}})
    report = export_checkpoint(tmp_path / "final", tmp_path / "vllm", kind="vllm")
    assert report.max_abs_diff <= report.tolerance
    config, modules = _adapter_targets(tmp_path / "vllm" / "adapter")
    assert config["use_rslora"] and config["r"] == 8 and {m.rsplit(".", 1)[1] for m in modules} == ATTENTION
