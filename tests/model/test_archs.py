"""Registry entries (vlmtune.model.archs) against the real module trees of every supported family.

Meta-device tests build each family's published config (``real_configs_families.py``) without weights and check
that every parameter lands in exactly one group, that the projector group is non-empty and is what the family
calls its projector. Training tests (``slow``) build a tiny random model of each family with its real
processor class and chat template, train projector LoRA + language-model attention LoRA for two steps through
``vlmtune.train.train``, and check that the projector's LoRA weights changed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from tests.real_configs_families import FAMILY_CONFIGS
from vlmtune.config.load import load_config
from vlmtune.model.archs import GROUPS, REGISTRY, arch_from_dict, find_arch
from vlmtune.model.groups import assign_groups, group_of, linear_modules, strip_peft_prefix
from vlmtune.model.load import arch_for

# repo id -> (registry entry, the projector's module roots, published parameter count or None)
EXPECTED = {
    "Qwen/Qwen3-VL-4B-Instruct": ("qwen3_vl", {"model.visual.merger", "model.visual.deepstack_merger_list"}, 4.44e9),
    "llava-hf/llava-1.5-7b-hf": ("llava", {"model.multi_modal_projector"}, 7.06e9),
    "llava-hf/llava-v1.6-mistral-7b-hf": ("llava_next", {"model.multi_modal_projector", "model.image_newline"}, 7.57e9),
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": (
        "llava_onevision",
        {"model.multi_modal_projector", "model.image_newline"},
        0.894e9,
    ),
    "HuggingFaceTB/SmolVLM-256M-Instruct": ("idefics3", {"model.connector"}, 0.256e9),
    "google/gemma-3-4b-it": ("gemma3", {"model.multi_modal_projector"}, 4.30e9),
    "google/paligemma-3b-pt-224": ("paligemma", {"model.multi_modal_projector"}, 2.92e9),
    # The hub's counts for these two include an untied lm_head that the copies transcribed here do not say.
    "OpenGVLab/InternVL3-1B-hf": ("internvl", {"model.multi_modal_projector"}, None),
    "mistralai/Mistral-Small-3.1-24B-Instruct-2503": ("mistral3", {"model.multi_modal_projector"}, None),
}

_BUILT: dict[str, tuple] = {}


def _build(repo_id: str):
    if repo_id not in _BUILT:
        cfg = transformers.AutoConfig.for_model(**copy.deepcopy(FAMILY_CONFIGS[repo_id]))
        with torch.device("meta"):
            model = transformers.AutoModelForImageTextToText.from_config(cfg)
        _BUILT[repo_id] = (cfg, model)
    return _BUILT[repo_id]


def test_every_listed_family_has_a_config_and_an_entry():
    assert set(FAMILY_CONFIGS) == set(EXPECTED)
    for repo_id, (entry, _, _) in EXPECTED.items():
        assert find_arch(FAMILY_CONFIGS[repo_id]["model_type"]).name == entry
    assert find_arch("smolvlm").name == "idefics3"


@pytest.mark.parametrize("repo_id", list(EXPECTED))
def test_every_parameter_in_exactly_one_group(repo_id):
    cfg, model = _build(repo_id)
    entry, projector_roots, published = EXPECTED[repo_id]
    names = [n for n, _ in model.named_parameters()]
    assert all(p.device.type == "meta" for p in model.parameters())
    groups = assign_groups(names, find_arch(cfg.model_type))
    assert groups.arch.name == entry and groups.layout.name.startswith("nested")
    assert list(groups.param_groups) == names and set(groups.param_groups.values()) <= set(GROUPS)
    for group in ("vision_tower", "projector", "language_model"):
        assert groups.params_in(group), group
    # the projector is exactly the family's projector modules, nothing more or less
    projector = groups.params_in("projector")
    assert {r for r in projector_roots if any(n == r or n.startswith(r + ".") for n in projector)} == projector_roots
    assert all(any(n == r or n.startswith(r + ".") for r in projector_roots) for n in projector)
    assert all(
        n.startswith(("model.vision_tower.", "model.visual.", "model.vision_model."))
        for n in groups.params_in("vision_tower")
    )
    assert all(n.startswith(("model.language_model.", "model.text_model.")) for n in groups.params_in("language_model"))
    assert groups.params_in("lm_head") in ([], ["lm_head.weight"])
    assert linear_modules(model, groups, "projector") or entry == "gemma3"  # Gemma 3 projects with a bare Parameter
    if published is not None:
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(published, rel=0.01)


def test_qwen3_vl_deepstack_mergers_are_projector_not_vision_tower():
    cfg, model = _build("Qwen/Qwen3-VL-4B-Instruct")
    groups = assign_groups([n for n, _ in model.named_parameters()], find_arch("qwen3_vl"))
    deepstack = [n for n in groups.param_groups if n.startswith("model.visual.deepstack_merger_list.")]
    assert len({n.split(".")[3] for n in deepstack}) == len(cfg.vision_config.deepstack_visual_indexes) == 3
    assert {groups.param_groups[n] for n in deepstack} == {"projector"}
    assert groups.group_of("model.visual.blocks.5.mlp.linear_fc1") == "vision_tower"


@pytest.mark.parametrize(
    "name, group",
    [
        ("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight", "vision_tower"),
        ("multi_modal_projector.linear_1.weight", "projector"),
        ("image_newline", "projector"),
        ("language_model.model.layers.0.self_attn.q_proj.weight", "language_model"),
        ("language_model.lm_head.weight", "lm_head"),
    ],
)
def test_legacy_llava_layout(name, group):
    # Checkpoints and code before transformers 4.52 held the causal LM whole under language_model.
    flat = REGISTRY["llava_next"].layouts[1]
    groups = assign_groups([name, "language_model.model.embed_tokens.weight"], REGISTRY["llava_next"])
    assert groups.layout == flat and groups.param_groups[name] == group


def test_unknown_architecture_lists_supported_and_explains_arch_entry():
    with pytest.raises(ValueError) as info:
        find_arch("mllama")
    message = str(info.value)
    for model_type in (
        "qwen2_vl",
        "qwen3_vl",
        "llava",
        "llava_next",
        "llava_onevision",
        "idefics3",
        "smolvlm",
        "gemma3",
        "paligemma",
        "internvl",
        "mistral3",
    ):
        assert f" {model_type}," in message or message.count(model_type), model_type
    assert "model.arch_entry" in message and "projector" in message


def test_user_entry_covers_a_family_without_editing_the_package():
    # A user-supplied entry spelling the LLaVA layout resolves the real LLaVA-1.5 tree the same as the builtin one.
    _, model = _build("llava-hf/llava-1.5-7b-hf")
    names = [n for n, _ in model.named_parameters()]
    user = arch_from_dict(
        "my_llava",
        {
            "model_types": ["llava"],
            "patterns": {
                "vision_tower": ["model.vision_tower"],
                "projector": ["model.multi_modal_projector"],
                "language_model": ["model.language_model"],
                "lm_head": ["lm_head"],
            },
        },
    )
    assert assign_groups(names, user).param_groups == assign_groups(names, REGISTRY["llava"]).param_groups
    # The same entry written in a config (model.arch_entry, validated as a typed section) resolves the same.
    mcfg = load_config(
        None,
        [
            "model.arch=my_llava",
            "model.arch_entry={model_types: [llava], patterns: {vision_tower: [model.vision_tower], "
            "projector: [model.multi_modal_projector], language_model: [model.language_model], lm_head: [lm_head]}}",
        ],
    ).model
    from_config = arch_for(model, mcfg)
    assert from_config.name == "my_llava" and from_config.layouts == user.layouts


# ---------------------------------------------------------------------------------------------
# Two training steps per family: tiny random model, real processor and chat template
# ---------------------------------------------------------------------------------------------

ASSETS = __import__("pathlib").Path(__file__).parents[1] / "assets"


def _data(tmp_path):
    from tests.conftest import write_jsonl

    records = [
        {
            "messages": [
                {"role": "user", "content": "<image>What color is the shape?"},
                {"role": "assistant", "content": "red"},
            ],
            "images": [str(ASSETS / "red_square.png")],
        },
        {
            "messages": [
                {"role": "user", "content": "<image>What color is the shape?"},
                {"role": "assistant", "content": "blue"},
            ],
            "images": [str(ASSETS / "blue_circle.png")],
        },
        {
            "messages": [
                {"role": "user", "content": "Describe a square."},
                {"role": "assistant", "content": "a red square"},
            ]
        },
    ]
    return write_jsonl(tmp_path / "train.jsonl", records)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family",
    ["qwen3_vl", "llava", "llava_next", "llava_onevision", "idefics3", "gemma3", "internvl", "mistral3", "paligemma"],
)
def test_two_training_steps_move_the_projector(family, tmp_path):
    from safetensors.torch import load_file

    from tests.tiny_families import save_family
    from vlmtune.cli import main

    folder = save_family(family, tmp_path / "model")
    # Gemma 3 projects with a bare weight matrix (no nn.Linear for LoRA), so its projector trains fully.
    projector = (
        "{mode: full, lr: 1.0e-2}"
        if family == "gemma3"
        else "{mode: lora, rank: 4, alpha: 8, targets: all-linear, lr: 1.0e-2}"
    )
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {{path: {folder}}}\n"
        "groups:\n"
        "  vision_tower: {mode: frozen}\n"
        f"  projector: {projector}\n"
        "  language_model: {mode: lora, rank: 4, alpha: 8, targets: attention, lr: 1.0e-2}\n"
        "  lm_head: {mode: frozen}\n"
        f"data: {{train: {_data(tmp_path)}, max_length: 256}}\n"
        f"train: {{output_dir: {tmp_path / 'run'}, max_steps: 2, batch_size: 3, warmup_steps: 0, logging_steps: 1, "
        "eval_steps: 100, save_steps: 100, seed: 0, progress_bar: false}\n",
        encoding="utf-8",
    )
    assert main(["train", str(cfg)]) == 0
    weights = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    layout = find_arch(family).layouts[0]  # the layout of the installed transformers' module names

    def group(key: str) -> str | None:
        return group_of(strip_peft_prefix(key).replace(".lora_A", "").replace(".lora_B", ""), layout)

    projector_keys = [k for k in weights if group(k) == "projector"]
    assert projector_keys, sorted(weights)
    if family == "gemma3":
        base = dict(transformers.AutoModelForImageTextToText.from_pretrained(folder).named_parameters())
        moved = [k for k in projector_keys if not torch.equal(weights[k], base[strip_peft_prefix(k)])]
        assert any(k.endswith("mm_input_projection_weight") for k in moved), projector_keys
    else:
        lora_b = [k for k in projector_keys if "lora_B" in k]
        if family == "qwen3_vl":  # the deepstack mergers are projector LoRA too, and train
            assert any("deepstack_merger_list.0.linear_fc1.lora_B" in k for k in lora_b)
        zero = [k for k in lora_b if weights[k].abs().sum() == 0]
        assert lora_b and not zero, f"projector LoRA B must have moved from zero: {zero}"
    assert any(".self_attn." in k and "lora_A" in k and group(k) == "language_model" for k in weights)


def _batch(family: str, tmp_path):
    from tests.tiny_families import FAMILIES
    from vlmtune.config.data import DataConfig
    from vlmtune.data.collate import collate
    from vlmtune.data.dataset import build_dataset

    cfg, processor = FAMILIES[family]()
    ds = build_dataset(str(_data(tmp_path)), DataConfig(max_length=256), processor, "eval")
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(getattr(tok, "image_token", None) or processor.image_token)
    return cfg, processor, collate([ds[i] for i in range(len(ds))], tok.pad_token_id, image_id), image_id


def test_paligemma_answer_is_the_causal_suffix(tmp_path):
    """PaliGemma is a prefix-LM: token_type_ids 0 (image, question: bidirectional), 1 (answer: causal)."""
    from PIL import Image

    from vlmtune.data.collate import IGNORE

    cfg, processor, batch, _ = _batch("paligemma", tmp_path)
    # The image sample, token for token as upstream's fine-tuning call encodes it (prefix + suffix=answer).
    image = Image.open(ASSETS / "red_square.png").convert("RGB")
    ref = processor(text=["<image>What color is the shape?"], images=[image], suffix=["red"], return_tensors="pt")
    n = ref["input_ids"].shape[1]
    assert int(batch["attention_mask"][0].sum()) == n
    for key in ("input_ids", "token_type_ids", "labels"):
        assert batch[key][0, :n].tolist() == ref[key][0].tolist(), key
    # The text-only sample: "<bos>Describe a square.\n" is the prefix, "a red square<eos>" the suffix.
    tok = processor.tokenizer
    prefix = tok("<bos>Describe a square.\n", add_special_tokens=False)["input_ids"]
    suffix = tok("a red square<eos>", add_special_tokens=False)["input_ids"]
    m = len(prefix) + len(suffix)
    assert batch["input_ids"][2, :m].tolist() == prefix + suffix
    assert batch["token_type_ids"][2, :m].tolist() == [0] * len(prefix) + [1] * len(suffix)
    assert batch["labels"][2, :m].tolist() == [IGNORE] * len(prefix) + suffix
    # With these types the model cannot see the answer ahead: changing the last answer token leaves every earlier
    # logit alone. Marking the answer as prefix (all 0) would let it (the test of the test).
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(cfg).eval()
    inputs = {k: batch[k][:1, :n] for k in ("input_ids", "attention_mask", "token_type_ids")}
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    changed["input_ids"][0, -1] = tok.convert_tokens_to_ids("<pad>")

    def logits(x: dict) -> torch.Tensor:
        with torch.no_grad():
            return model(**x, pixel_values=batch["pixel_values"][:1]).logits[0, :-1]

    assert torch.allclose(logits(inputs), logits(changed))
    all_prefix = {
        k: dict(v, token_type_ids=torch.zeros_like(v["token_type_ids"])) for k, v in (("a", inputs), ("b", changed))
    }
    assert not torch.allclose(logits(all_prefix["a"]), logits(all_prefix["b"]))


def test_gemma3_token_types_still_mark_only_image_tokens(tmp_path):
    _, _, batch, image_id = _batch("gemma3", tmp_path)
    assert batch["token_type_ids"].tolist() == (batch["input_ids"] == image_id).long().tolist()
    assert (batch["labels"] != -100).any() and not batch["token_type_ids"][batch["labels"] != -100].any()


@pytest.mark.parametrize(
    "family",
    ["llava", "llava_next", "llava_onevision", "idefics3", "gemma3", "paligemma", "internvl", "mistral3", "qwen3_vl"],
)
def test_evaluation_and_generation_run_on_processor_expanded_families(family, tmp_path):
    """Eval (loss, generation, ablation, retrieval, projector cosine) encodes through the family's processor."""
    from tests.tiny_families import save_family
    from vlmtune.config.data import DataConfig
    from vlmtune.config.schema import EvalConfig
    from vlmtune.data.dataset import build_dataset
    from vlmtune.eval.evaluate import eval_record

    folder = save_family(family, tmp_path / "model")
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder)
    processor = transformers.AutoProcessor.from_pretrained(folder)
    ds = build_dataset(str(_data(tmp_path)), DataConfig(max_length=512), processor, "eval")
    metrics = eval_record(model, processor, ds, EvalConfig(retrieval_k=2, max_new_tokens=4), arch=find_arch(family))
    for key in (
        "eval/loss",
        "eval/exact_match",
        "eval/ablation_gap_blank",
        "eval/retrieval_r1",
        "eval/projector_cos_gap",
    ):
        assert key in metrics and metrics[key] == metrics[key], (key, metrics)  # present and not NaN
    assert metrics["eval/alignment_samples"] == 2  # the two samples with an image


@pytest.mark.parametrize(
    "family",
    ["llava", "llava_next", "llava_onevision", "idefics3", "gemma3", "paligemma", "internvl", "mistral3", "qwen3_vl"],
)
def test_doctor_passes_on_processor_expanded_families(family, tmp_path, capsys):
    from tests.tiny_families import save_family
    from vlmtune.cli import main

    folder = save_family(family, tmp_path / "model")
    projector = "{mode: full}" if family == "gemma3" else "{mode: lora, rank: 4}"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {{path: {folder}}}\ngroups: {{projector: {projector}, language_model: {{mode: lora, rank: 4, "
        f"targets: attention}}}}\ndata: {{train: {_data(tmp_path)}, max_length: 512}}\ntrain: {{batch_size: 3}}\n",
        encoding="utf-8",
    )
    rc = main(["doctor", str(cfg)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS  dimensions: image tokens" in out and "PASS  gradient flow" in out
