"""The command line: every failure ends in one ``error:`` message and an exit code; ``--debug`` shows the traceback."""

from __future__ import annotations

import pytest

from tests.commands.test_loading import lora_checkpoint
from tests.tiny_families import TEXT
from vlmtune.cli import UNEXPECTED_EXIT, main


def test_a_file_system_fault_is_one_message_naming_the_path(tiny_dir, tmp_path, capsys):
    lora_checkpoint(tiny_dir, tmp_path / "final")
    (tmp_path / "taken").write_text("a file where a folder should be", encoding="utf-8")
    out = tmp_path / "taken" / "predictions.jsonl"
    args = ["predict", "--checkpoint", str(tmp_path / "final"), "--data", "builtin:shapes:color", "--limit", "1"]
    assert main([*args, "--out", str(out)]) == UNEXPECTED_EXIT
    err = capsys.readouterr().err  # transformers' progress bars come first
    message = err[err.index("error: ") :]
    assert str(tmp_path / "taken") in message and "Traceback" not in err and len(message.splitlines()) == 2
    assert "--debug" in message
    with pytest.raises(OSError):  # the traceback, on request
        main(["--debug", *args, "--out", str(out)])


def test_a_model_that_is_not_a_vision_language_model_is_named(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, **TEXT)  # a tiny text-only model
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{path: {tmp_path / 'llama'}}}\ntrain: {{output_dir: {out}}}\n", encoding="utf-8")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    message = err[err.index("error: ") :]
    assert f"'{tmp_path / 'llama'}' holds a 'llama' model: no vlmtune architecture entry" in message
    assert "model.arch_entry" in message and len(message.splitlines()) == 2 and "Traceback" not in err
    assert not out.exists()  # nothing was written
