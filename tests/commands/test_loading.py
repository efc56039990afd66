"""Loading checkpoints: what vlmtune train writes, plain model folders, and every incomplete folder named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from vlmtune.commands.loading import CheckpointError, load_checkpoint, resolve_checkpoint, with_overrides
from vlmtune.config.errors import ConfigError
from vlmtune.config.schema import Config

PROCESSOR = ("tokenizer_config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja")


def lora_checkpoint(tiny_dir: Path, out: Path, projector_full: bool = False, groups: dict | None = None):
    """A checkpoint as vlmtune train writes it (LoRA on attention, projector LoRA or full; ``groups`` overrides the
    groups' settings), with every adapter weight moved away from its initial value so that merging and loading
    matter. Returns (peft model, processor)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmtune.config.overrides import deep_merge
    from vlmtune.config.schema import DEFAULT_GROUPS
    from vlmtune.model.groups import assign_groups
    from vlmtune.model.load import arch_for
    from vlmtune.model.tuning import apply_plan, build_plan
    from vlmtune.train.checkpoint import save_checkpoint

    groups = deep_merge(DEFAULT_GROUPS, {"projector": {"mode": "full" if projector_full else "lora"}, **(groups or {})})
    cfg = Config.model_validate({"model": {"path": str(tiny_dir)}, "groups": groups})
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    gmap = assign_groups([n for n, _ in model.named_parameters()], arch_for(model, cfg.model))
    torch.manual_seed(1)
    model = apply_plan(model, gmap, build_plan(model, gmap, cfg))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(model, processor, cfg, out)
    return model.eval(), processor


def _touch(folder: Path, tiny_dir: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        if name in PROCESSOR:
            shutil.copy(tiny_dir / name, folder / name)
        else:
            (folder / name).write_text("{}")
    return folder


INCOMPLETE = [
    # name, files present, what the error must say
    ("empty", [], "has neither adapter_config.json (a peft adapter written by vlmtune train) nor config.json"),
    (
        "adapter-without-weights",
        ["adapter_config.json", "config.yaml", *PROCESSOR],
        "missing adapter_model.safetensors",
    ),
    (
        "adapter-without-config-yaml",
        ["adapter_config.json", "adapter_model.safetensors", *PROCESSOR],
        "missing config.yaml (config.yaml names the base model of the adapter)",
    ),
    ("model-without-weights", ["config.json", *PROCESSOR], "missing model.safetensors"),
    (
        "model-without-processor",
        ["config.json", "model.safetensors"],
        "missing tokenizer_config.json, processor_config.json or preprocessor_config.json",
    ),
    ("run-folder", ["metrics.jsonl", "config.yaml"], "(a run folder: give its final/ or a checkpoint-N/ folder)"),
]


@pytest.mark.parametrize("files,fragment", [c[1:] for c in INCOMPLETE], ids=[c[0] for c in INCOMPLETE])
def test_incomplete_checkpoint_names_the_missing_file(tiny_dir, tmp_path, files, fragment):
    folder = _touch(tmp_path / "ck", tiny_dir, files)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(folder)
    assert fragment in str(e.value) and str(folder) in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder '.*nowhere' does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_adapter_checkpoint_loads_onto_its_base_with_the_trained_weights(tiny_dir, tmp_path, shapes_dir):
    from peft import PeftModel

    trained, processor = lora_checkpoint(tiny_dir, tmp_path / "final", projector_full=True)
    model, loaded_processor, cfg = load_checkpoint(tmp_path / "final")
    assert isinstance(model, PeftModel) and not model.training
    assert cfg is not None and cfg.model.path == str(tiny_dir) and cfg.group("projector").mode == "full"
    ids = loaded_processor.tokenizer("What color is the shape?")["input_ids"]
    batch = {"input_ids": torch.tensor([ids])}
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, trained(**batch).logits, atol=1e-5)


def test_plain_model_folder_loads_without_a_run_config(tiny_dir):
    model, processor, cfg = load_checkpoint(tiny_dir)
    assert cfg is None and type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert processor.image_token == "<|image_pad|>"


def test_run_folder_stands_for_its_final_checkpoint(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert resolve_checkpoint(tmp_path / "run") == (tmp_path / "run" / "final", tmp_path / "run")
    assert resolve_checkpoint(tmp_path / "run" / "final") == (tmp_path / "run" / "final", tmp_path / "run")


def test_overrides_are_validated_with_the_key_named():
    assert with_overrides(None, ["eval.retrieval_k=4"]).eval.retrieval_k == 4
    with pytest.raises(ConfigError) as e:
        with_overrides(None, ["eval.retreival_k=4", "eval.samples=0"])
    assert "unknown key 'eval.retreival_k' (did you mean 'retrieval_k'?)" in str(e.value)
    assert "'eval.samples'" in str(e.value)


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "--data", "builtin:shapes:color", "--no-generate", "eval.samples=2", "eval.alignment=false"],
        ["predict", "--data", "builtin:shapes:color", "--out", "{tmp}/p.jsonl", "--limit", "1"],
        ["export", "--out", "{tmp}/export"],
    ],
    ids=["eval", "predict", "export"],
)
def test_a_checkpoint_cannot_switch_on_remote_code_for_itself(tiny_dir, tmp_path, capsys, command):
    import yaml

    from vlmtune.cli import main

    lora_checkpoint(tiny_dir, tmp_path / "final")
    saved = tmp_path / "final" / "config.yaml"
    cfg = yaml.safe_load(saved.read_text())
    cfg["model"]["trust_remote_code"] = True  # e.g. a checkpoint downloaded from someone else
    saved.write_text(yaml.safe_dump(cfg))
    args = [a.format(tmp=tmp_path) for a in command]
    assert main([args[0], "--checkpoint", str(tmp_path / "final"), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert "sets model.trust_remote_code: true" in err and "pass --trust-remote-code" in err
    assert not (tmp_path / "export").exists() and not (tmp_path / "p.jsonl").exists()
    # The user's own flag is the opt-in.
    assert main([args[0], "--checkpoint", str(tmp_path / "final"), "--trust-remote-code", *args[1:]]) == 0


def test_the_checkpoints_setting_is_never_passed_on(tiny_dir, tmp_path, monkeypatch):
    import transformers
    import yaml

    lora_checkpoint(tiny_dir, tmp_path / "final")
    saved = tmp_path / "final" / "config.yaml"
    cfg = yaml.safe_load(saved.read_text())
    cfg["model"]["trust_remote_code"] = True
    saved.write_text(yaml.safe_dump(cfg))
    seen = []
    original = transformers.AutoProcessor.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", spy)
    load_checkpoint(tmp_path / "final", trust_remote_code=True)
    assert seen and all(v is True for v in seen)
    saved.write_text(saved.read_text().replace("trust_remote_code: true", "trust_remote_code: false"))
    seen.clear()
    load_checkpoint(tmp_path / "final")
    assert seen and all(v is False for v in seen)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("model: {path: [unclosed", "is damaged: not valid YAML"),
        ("- a list", "is damaged: not a mapping of config keys"),
    ],
    ids=["bad-yaml", "not-a-mapping"],
)
def test_a_damaged_config_inside_a_checkpoint_is_named(tiny_dir, tmp_path, capsys, content, expected):
    from vlmtune.cli import main

    lora_checkpoint(tiny_dir, tmp_path / "final")
    (tmp_path / "final" / "config.yaml").write_text(content, encoding="utf-8")
    assert main(["export", "--checkpoint", str(tmp_path / "final"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'final' / 'config.yaml'} {expected}" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "base"], ids=["adapter", "base-weights"])
def test_damaged_weights_are_named_not_a_traceback(tiny_dir, tmp_path, capsys, name):
    from vlmtune.cli import main

    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    lora_checkpoint(base, tmp_path / "final")
    path = tmp_path / "final" / name if name != "base" else base / "model.safetensors"
    path.write_bytes(path.read_bytes()[:200])  # a download or copy cut short
    assert main(["export", "--checkpoint", str(tmp_path / "final"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{path} is damaged (" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_every_adapter_of_a_checkpoint_is_loaded_and_checked(tiny_dir, tmp_path):
    # groups with different LoRA variants are adapters of their own: all load, all active
    lora_checkpoint(tiny_dir, tmp_path / "final", groups={"language_model": {"rslora": True}})
    model, _, _ = load_checkpoint(tmp_path / "final")
    assert model.active_adapters == ["default", "language_model_lora"]
    assert model.peft_config["language_model_lora"].use_rslora and not model.peft_config["default"].use_rslora
    (tmp_path / "final" / "language_model_lora" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete: missing language_model_lora/adapter_model.safetensors"):
        load_checkpoint(tmp_path / "final")
