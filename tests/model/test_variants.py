"""LoRA variants per group (groups.<g>.dora, rslora, init, lr_ratio_b): what reaches peft, what trains, what is saved
and loaded back, and one adapter per group when the groups' variants differ."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml

from vlmtune.config.errors import ConfigError
from vlmtune.config.load import load_config
from vlmtune.config.stages import resolve_stages
from vlmtune.model.build import build_model
from vlmtune.train.checkpoint import write_model
from vlmtune.train.optim import describe, param_groups

CPU = torch.device("cpu")
Q_PROJ = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
MERGER = "base_model.model.model.visual.merger.mlp.0"


def _built(tiny_dir, *overrides):
    cfg = load_config(
        None, [f"model.path={tiny_dir}", "groups.projector.rank=4", "groups.language_model.rank=4", *overrides]
    )
    return cfg, build_model(cfg, resolve_stages(cfg), tiny_dir, CPU, echo=lambda *a: None)


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _train(model, batch, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on the trainable parameters (enough to move every adapter well away from its start)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture(scope="module")
def base_logits(tiny, compare_batch) -> torch.Tensor:
    return _logits(copy.deepcopy(tiny[0]), compare_batch)


# name, overrides, what peft's config of the language model's adapter says, a check on its q_proj LoRA layer
VARIANTS = [
    ("plain", [], {"use_dora": False, "use_rslora": False, "init_lora_weights": True}, None),
    ("dora", ["groups.language_model.dora=true"], {"use_dora": True}, lambda m, a: a in m.lora_magnitude_vector),
    (
        "rslora",
        ["groups.language_model.rslora=true"],
        {"use_rslora": True},
        lambda m, a: m.scaling[a] == pytest.approx(8 / math.sqrt(4)),
    ),
    ("gaussian", ["groups.language_model.init=gaussian"], {"init_lora_weights": "gaussian"}, None),
    ("pissa", ["groups.language_model.init=pissa"], {"init_lora_weights": "pissa"}, None),
    ("pissa_niter", ["groups.language_model.init=pissa_niter_4"], {"init_lora_weights": "pissa_niter_4"}, None),
    ("olora", ["groups.language_model.init=olora"], {"init_lora_weights": "olora"}, None),
]


@pytest.mark.parametrize("name,overrides,expected,layer_check", VARIANTS, ids=[c[0] for c in VARIANTS])
def test_each_variant_reaches_peft_and_starts_as_the_base_model(
    tiny_dir, compare_batch, base_logits, name, overrides, expected, layer_check
):
    # every group that differs from the projector's plain LoRA gets an adapter of its own, both active
    _, built = _built(tiny_dir, *overrides)
    model = built.model
    adapter = "default" if name == "plain" else "language_model_lora"
    assert list(model.peft_config) == (["default"] if name == "plain" else ["default", "language_model_lora"])
    assert model.active_adapters == list(model.peft_config)
    config = model.peft_config[adapter]
    assert {k: getattr(config, k) for k in expected} == expected
    q = model.get_submodule(Q_PROJ)
    assert list(q.lora_A) == [adapter] and list(model.get_submodule(MERGER).lora_A) == ["default"]
    if layer_check is not None:
        assert layer_check(q, adapter)
    # PiSSA and OLoRA move the principal directions out of the base weight into A and B: same function, B non-zero
    moved = name in ("pissa", "pissa_niter", "olora")
    assert bool(q.lora_B[adapter].weight.any()) == moved
    assert (adapter in built.initial) == moved  # their starting weights are kept, to save them converted
    assert torch.allclose(_logits(model, compare_batch), base_logits, atol=1e-4)


def test_a_dora_step_trains_the_magnitudes(tiny_dir, compare_batch):
    _, built = _built(tiny_dir, "groups.language_model.dora=true", "groups.projector.dora=true")
    model = built.model
    assert list(model.peft_config) == ["default"]  # the same variant everywhere: one adapter, as without DoRA
    magnitudes = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert {built.gmap.group_of(n) for n in magnitudes} == {"projector", "language_model"}
    assert all(p.requires_grad for p in magnitudes.values())
    before = {n: p.detach().clone() for n, p in magnitudes.items()}
    model(**compare_batch).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in magnitudes.values())
    _train(model, compare_batch, steps=1)
    assert all(not torch.equal(before[n], p) for n, p in magnitudes.items())


def test_lora_plus_puts_the_b_matrices_in_groups_of_their_own(tiny_dir):
    _, built = _built(
        tiny_dir, "groups.projector.lr=1e-3", "groups.projector.lr_ratio_b=16", "groups.language_model.lr=5e-4"
    )
    groups = {g["name"]: g for g in param_groups(built.model, built.gmap, built.union)}
    assert sorted(groups) == ["language_model", "projector", "projector (lora B)"]
    assert groups["projector (lora B)"]["lr"] == pytest.approx(1.6e-2)
    assert groups["projector"]["lr"] == 1e-3 and groups["language_model"]["lr"] == 5e-4
    assert all(".lora_B." in n and "merger" in n for n in groups["projector (lora B)"]["param_names"])
    assert all(".lora_A." in n for n in groups["projector"]["param_names"])
    assert groups["projector (lora B)"]["component"] == "projector"
    assert any(
        line.startswith("optimizer group projector (lora B)") and "lr=1.60e-02" in line
        for line in describe(list(groups.values()))
    )


def _reload(folder, base_model):
    """What peft users do with a vlmtune adapter folder: from_pretrained, load_adapter per sub-folder, all active."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, folder)
    subs = sorted(p for p in folder.iterdir() if (p / "adapter_config.json").is_file())
    for sub in subs:
        model.load_adapter(sub, adapter_name=sub.name)
    model.base_model.set_adapter(["default", *(s.name for s in subs)])
    return model


SAVED = [
    ("dora lm, plain projector", ["groups.language_model.dora=true"], ["language_model_lora"], 4),
    ("pissa everywhere", ["groups.language_model.init=pissa", "groups.projector.init=pissa"], [], 8),
    (
        "olora projector + full vision tower, rslora pissa lm",
        [
            "groups.projector.init=olora",
            "groups.vision_tower.mode=full",
            "groups.language_model.init=pissa_niter_2",
            "groups.language_model.rslora=true",
        ],
        ["language_model_lora"],
        8,
    ),
]


@pytest.mark.parametrize("name,overrides,subfolders,saved_rank", SAVED, ids=[c[0] for c in SAVED])
def test_trained_variants_reload_onto_the_original_base_to_the_same_logits(
    tiny, tiny_dir, compare_batch, base_logits, tmp_path, name, overrides, subfolders, saved_rank
):
    import json

    from vlmtune.commands.loading import load_checkpoint

    cfg, built = _built(tiny_dir, *overrides)
    trains = {n for n, p in built.model.named_parameters() if p.requires_grad}
    _train(built.model, compare_batch)
    trained = _logits(built.model, compare_batch)
    assert not torch.allclose(trained, base_logits, atol=1e-3)
    out = tmp_path / "final"
    out.mkdir()
    write_model(built.model, built.processor, cfg, out, initial=built.initial)
    # saving converts PiSSA/OLoRA and leaves the run as it was: same trainable parameters, same function
    assert {n for n, p in built.model.named_parameters() if p.requires_grad} == trains
    assert torch.equal(_logits(built.model, compare_batch), trained)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == subfolders
    # PiSSA / OLoRA are saved as the difference to their start: a plain LoRA of twice the rank
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == saved_rank and saved["init_lora_weights"] is True
    for reloaded in (_reload(out, copy.deepcopy(tiny[0])), load_checkpoint(out)[0]):
        assert torch.allclose(_logits(reloaded, compare_batch), trained, atol=1e-4)


def test_a_resume_state_restores_into_a_fresh_build(tiny_dir, compare_batch):
    # resume copies the trained weights by name into a model built again from the config; PiSSA starts the same way
    from vlmtune.train.resume import Progress, TrainerState, load_trainable

    overrides = ["groups.language_model.init=pissa", "groups.projector.dora=true"]
    _, first = _built(tiny_dir, *overrides)
    _train(first.model, compare_batch)
    weights = {n: p.detach().clone() for n, p in first.model.named_parameters() if n in first.trained_params}
    _, again = _built(tiny_dir, *overrides)
    assert again.trained_params == first.trained_params
    assert list(first.initial) == ["language_model_lora"]
    start, start_again = first.initial["language_model_lora"], again.initial["language_model_lora"]
    assert start.keys() == start_again.keys() and all(torch.equal(start_again[k], v) for k, v in start.items())
    load_trainable(again.model, TrainerState(tiny_dir, Progress(), weights, None, None, None), again.trained_params)
    assert torch.equal(_logits(again.model, compare_batch), _logits(first.model, compare_batch))


PROBLEMS = [
    ("unknown init", ["groups.projector.init=pisa"], "'groups.projector.init': 'pisa' is not one of default, gaussian"),
    ("pissa_niter without N", ["groups.projector.init=pissa_niter_"], "pissa_niter_N (N >= 1"),
    ("loftq without quantize", ["groups.language_model.init=loftq"], "'groups.language_model.init' is loftq but model"),
    ("loftq with fp4", ["groups.language_model.init=loftq", "model.quantize=fp4"], "model.quantize is fp4"),
    (
        "loftq with quantize true",
        ["groups.language_model.init=loftq", "model.quantize=nf4", "groups.language_model.quantize=true"],
        "'groups.language_model.quantize' is true but groups.language_model.init is loftq",
    ),
    (
        "pissa with dora",
        ["groups.projector.init=pissa", "groups.projector.dora=true"],
        "'groups.projector.dora' is true with groups.projector.init pissa",
    ),
    (
        "variant on a full group",
        ["groups.projector.mode=full", "groups.projector.dora=true", "groups.projector.lr_ratio_b=4"],
        "'groups.projector' trains fully (mode full) but sets dora, lr_ratio_b, which apply to LoRA only",
    ),
    ("negative ratio", ["groups.projector.lr_ratio_b=-2"], "groups.projector.lr_ratio_b"),
]


@pytest.mark.parametrize("name,overrides,fragment", PROBLEMS, ids=[c[0] for c in PROBLEMS])
def test_bad_variant_settings_name_the_key(name, overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert any(fragment in p for p in e.value.problems), e.value.problems


def test_a_group_keeps_its_variant_across_stages(tmp_path):
    path = tmp_path / "staged.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "groups": {"projector": {"mode": "lora"}},
                "stages": [
                    {"name": "a", "steps": 1, "groups": {"projector": {"lr_ratio_b": 4}}},
                    {"name": "b", "steps": 1, "groups": {"projector": {"dora": True}}},
                ],
            }
        )
    )
    with pytest.raises(ConfigError) as e:
        load_config(path, echo=lambda *a: None)
    (problem,) = e.value.problems
    assert "groups.projector: LoRA weights carry over between stages, so rank, alpha, targets, dora" in problem
    assert "stages[0] (a): rank 16" in problem and "dora True" in problem
    # the LoRA+ ratio is the optimizer's: it may change from stage to stage
    path.write_text(
        yaml.safe_dump(
            {
                "groups": {"projector": {"mode": "lora"}},
                "stages": [{"name": "a", "steps": 1, "groups": {"projector": {"lr_ratio_b": 4}}}],
            }
        )
    )
    assert load_config(path, echo=lambda *a: None).stages[0].groups.projector.lr_ratio_b == 4


def test_pissa_on_a_quantized_group_is_refused_naming_the_key(tiny_dir):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ConfigError) as e:
        _built(tiny_dir, "model.quantize=nf4", "groups.language_model.init=pissa")
    (problem,) = e.value.problems
    assert problem.startswith("groups.language_model.init is pissa, which rewrites the base weights")
    assert "set groups.language_model.quantize: false" in problem
    # the projector is not quantized by default: PiSSA trains there beside a 4-bit language model
    _, built = _built(tiny_dir, "model.quantize=nf4", "groups.projector.init=pissa")
    assert "default" in built.initial


@pytest.mark.skipif(torch.cuda.is_available(), reason="LoftQ runs where CUDA is")
def test_loftq_on_a_machine_without_a_gpu_is_refused(tiny_dir):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ConfigError) as e:
        _built(tiny_dir, "model.quantize=nf4", "groups.language_model.init=loftq")
    (problem,) = e.value.problems
    assert problem.startswith("groups.language_model.init is loftq, which quantizes on a GPU only")


@pytest.mark.gpu
def test_loftq_starts_from_the_quantization_error_and_reloads(tiny_dir, compare_batch, tmp_path):
    pytest.importorskip("bitsandbytes")
    from vlmtune.commands.loading import load_checkpoint

    gpu = {k: v.cuda() if torch.is_tensor(v) else v for k, v in compare_batch.items()}
    cfg = load_config(None, [f"model.path={tiny_dir}", "model.quantize=nf4", "groups.language_model.init=loftq"])
    built = build_model(cfg, resolve_stages(cfg), tiny_dir, torch.device("cuda"), echo=lambda *a: None)
    config = built.model.peft_config["language_model_lora"]
    assert config.init_lora_weights == "loftq" and config.loftq_config["loftq_bits"] == 4
    q = built.model.get_submodule(Q_PROJ)
    assert type(q.base_layer) is torch.nn.Linear and bool(q.lora_B["language_model_lora"].weight.any())
    _train(built.model, gpu)
    trained = _logits(built.model, gpu)
    out = tmp_path / "final"
    out.mkdir()
    write_model(built.model, built.processor, cfg, out, initial=built.initial)
    reloaded, _, _ = load_checkpoint(out, "cuda")
    assert torch.allclose(_logits(reloaded, gpu), trained, atol=1e-3)


def test_dora_on_a_4bit_language_model_trains(tiny_dir):
    bnb = pytest.importorskip("bitsandbytes")
    _, built = _built(tiny_dir, "model.quantize=nf4", "groups.language_model.dora=true")
    q = built.model.get_submodule(Q_PROJ)
    assert isinstance(q.base_layer, bnb.nn.Linear4bit) and q.use_dora["language_model_lora"]
    ids = torch.randint(0, 50, (2, 12))
    built.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    grads = [p.grad for n, p in built.model.named_parameters() if "language_model" in n and "magnitude" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_pissa_weights_are_never_saved_without_their_start(tiny_dir, tmp_path):
    cfg, built = _built(tiny_dir, "groups.projector.init=olora")
    with pytest.raises(ValueError, match=r"adapters \['default'\] start with PiSSA/OLoRA"):
        write_model(built.model, built.processor, cfg, tmp_path, initial={})


RUN = """
model: {{path: {model}}}
groups:
  projector: {{mode: lora, rank: 4, lr: 1.0e-3, lr_ratio_b: 16, init: pissa}}
  language_model: {{mode: lora, rank: 4, targets: attention, dora: true, init: gaussian}}
data: {{train: builtin:shapes:color, max_length: 256, builtin_train_samples: 8}}
train: {{max_steps: 2, batch_size: 4, logging_steps: 1, save_steps: 1, output_dir: {out}, progress_bar: false}}
"""


def test_a_run_logs_the_lora_plus_rate_resumes_and_its_final_folder_loads(tiny_dir, tmp_path, capsys):
    import json
    import shutil

    from safetensors.torch import load_file

    from vlmtune.cli import main
    from vlmtune.commands.loading import load_checkpoint

    config = tmp_path / "run.yaml"
    config.write_text(RUN.format(model=tiny_dir, out=tmp_path / "run"))
    assert main(["train", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "4/8/0 pissa B x16" in printed and "4/8/0 dora gaussian" in printed  # the plan table
    assert "optimizer group projector (lora B)" in printed
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps and all(r["lr/projector (lora B)"] == pytest.approx(16 * r["lr/projector"]) for r in steps)
    final = tmp_path / "run" / "final"
    assert (final / "language_model_lora" / "adapter_model.safetensors").is_file()
    model, _, _ = load_checkpoint(final)
    assert model.active_adapters == ["default", "language_model_lora"]
    assert model.peft_config["language_model_lora"].use_dora and model.peft_config["default"].r == 8  # PiSSA, converted
    # stopped after step 1 and resumed, the run starts PiSSA the same way and ends with the same adapters
    shutil.copytree(tmp_path / "run", tmp_path / "again", ignore=shutil.ignore_patterns("final"))
    assert main(["train", str(config), f"train.output_dir={tmp_path / 'again'}", "--resume"]) == 0
    assert f"resuming from {tmp_path / 'again' / 'checkpoint-1'}" in capsys.readouterr().out
    for sub in ("adapter_model.safetensors", "language_model_lora/adapter_model.safetensors"):
        first, resumed = load_file(final / sub), load_file(tmp_path / "again" / "final" / sub)
        assert first.keys() == resumed.keys() and all(torch.allclose(first[k], resumed[k], atol=1e-6) for k in first)
