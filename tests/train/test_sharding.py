"""``train.sharding: fsdp`` (torch FSDP2 on CPU processes joined by gloo): what the config refuses, the blank image a
process without images runs, and two-process runs against one process with the same global batch, killed and
resumed from each process's shard of the optimizer states, and launched as two nodes on one machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import write_jsonl
from tests.train.test_distributed import WEIGHTS_RTOL, _assert_same_steps, _max_rel_diff, _run, _steps
from vlmtune.config.errors import ConfigError
from vlmtune.config.load import load_config
from vlmtune.train.sharding import LAYOUT_FILE, VisionPresence, resume_problem

# Every kind of group at once: the vision tower with LoRA (its blocks sharded and trained), the projector trained
# fully, the language model with LoRA, lm_head frozen.
CONFIG = """
model: {path: builtin:tiny-qwen2-vl}
groups:
  vision_tower: {mode: lora, rank: 4, lr: 1.0e-3}
  projector: {mode: full, lr: 1.0e-3}
  language_model: {mode: lora, rank: 8, targets: attention, lr: 1.0e-3}
data: {train: DATA, max_length: 256}
train: {max_steps: 6, batch_size: 2, save_steps: 2, logging_steps: 1, seed: 3, progress_bar: false}
"""


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.method=dpo"], "train.method is dpo"),
        (["train.packing=true"], "train.packing is true"),
        (
            ["groups.language_model.mode=lora", "groups.language_model.init=pissa"],
            "'groups.language_model.init' is pissa",
        ),
        (["model.quantize=nf4"], "'model.quantize' is nf4"),
    ],
)
def test_sharding_refuses_what_it_does_not_run(tmp_path, overrides, expected):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {path: builtin:tiny-qwen2-vl}\ngroups: {language_model: {mode: lora}}\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError) as raised:
        load_config(config, ["train.sharding=fsdp", *overrides], echo=lambda *a: None)
    assert expected in str(raised.value) and "train.sharding" in str(raised.value)
    load_config(config, overrides, echo=lambda *a: None)  # the same config without sharding is valid


@pytest.mark.parametrize(
    "written, sharded, processes, refused",
    [
        (None, False, 1, None),  # an unsharded checkpoint, an unsharded run
        (None, True, 2, "without train.sharding: fsdp"),
        (2, True, 2, None),
        (2, True, 1, "resume it with 2 processes"),
        (2, True, 4, "resume it with 2 processes"),
        (2, False, 2, "resume it with 2 processes and train.sharding: fsdp"),
    ],
)
def test_a_sharded_checkpoint_resumes_with_its_process_count_only(tmp_path, written, sharded, processes, refused):
    if written is not None:
        (tmp_path / LAYOUT_FILE).write_text(json.dumps({"processes": written}), encoding="utf-8")
    why = resume_problem(tmp_path, sharded, processes)
    assert why is None if refused is None else refused in why


def test_the_blank_image_changes_no_loss_and_no_gradient(base_dir):
    """A process without images runs the vision tower on a blank image (so that every process runs the sharded
    blocks); what it adds must be exactly zero: the same loss bit for bit, the same gradients, and exact zeros in
    the tower's gradients."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(base_dir)
    processor = AutoProcessor.from_pretrained(base_dir)
    ids = processor.tokenizer(["Say the number 7. 7"], return_tensors="pt")["input_ids"]

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss, grads = loss_and_grads()
    presence = VisionPresence(model.model, processor)
    presence.install()
    presence.any_process = lambda local: True  # as if another process's batch held an image
    blank_loss, blank_grads = loss_and_grads()
    assert torch.equal(blank_loss, loss)
    tower = [n for n in grads if n.startswith("model.visual.")]
    assert tower and all(grads[n] is None for n in tower)  # without the blank image the tower does not run
    for name, grad in blank_grads.items():
        if name in tower:
            assert grad is not None and not grad.any(), name  # it ran, and contributes exact zeros
        else:
            assert torch.equal(grad, grads[name]), name


def _mixed_data(shapes_dir: Path, tmp_path: Path) -> Path:
    """3 samples with an image among 9 text-only ones: with one sample per process, some steps give one process an
    image and the other none, some give neither an image."""
    with_image = [json.loads(line) for line in (shapes_dir / "train.jsonl").read_text().splitlines()[:3]]
    for record in with_image:
        record["images"] = [str(shapes_dir / p) for p in record["images"]]
    text_only = [
        {"messages": [{"role": "user", "content": f"Say the number {i}."}, {"role": "assistant", "content": f"{i}"}]}
        for i in range(9)
    ]
    return write_jsonl(tmp_path / "mixed.jsonl", with_image + text_only)


@pytest.fixture(scope="module")
def runs(base_dir, shapes_dir, tmp_path_factory):
    """The config, and the one-process run (global batch 2) every multi-process run is compared with."""
    tmp = tmp_path_factory.mktemp("sharding")
    config = tmp / "run.yaml"
    config.write_text(CONFIG.replace("DATA", str(_mixed_data(shapes_dir, tmp))), encoding="utf-8")
    one = tmp / "one"
    _run([str(config), f"train.output_dir={one}"], 1)
    return {"config": config, "one": one, "tmp": tmp}


@pytest.fixture(scope="module")
def sharded(runs):
    """Two processes x batch 1, sharded, run to the end."""
    out = runs["tmp"] / "sharded"
    _run([str(runs["config"]), f"train.output_dir={out}", "train.batch_size=1", "train.sharding=fsdp"], 2)
    return out


@pytest.mark.slow
def test_two_sharded_processes_equal_one_with_the_same_global_batch(base_dir, runs, sharded):
    one = runs["one"]
    projector = [s.get("grad_norm/projector", 0.0) for s in _steps(one)]
    assert 0.0 in projector and any(g > 0 for g in projector)  # steps without any image, and steps with one
    # Same tolerances as DDP (tests/train/test_distributed.py): the same sums in another order.
    _assert_same_steps(one, sharded, 6)
    assert _max_rel_diff(one / "final", sharded / "final") <= WEIGHTS_RTOL
    # Each process wrote its shard of the optimizer states; final/ is a plain adapter that peft loads alone.
    state = sharded / "checkpoint-2" / "trainer_state"
    assert sorted(p.name for p in (state / "optimizer").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert json.loads((state / LAYOUT_FILE).read_text()) == {"processes": 2}
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    base = Qwen2VLForConditionalGeneration.from_pretrained(base_dir)
    loaded = PeftModel.from_pretrained(base, sharded / "final")
    names = {n for n, _ in loaded.named_parameters()}
    assert any(".lora_A." in n for n in names) and any("modules_to_save" in n for n in names)


def _launch(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in process groups of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to the launcher and each of its workers at once, as a machine failure would."""
    pids = [proc.pid, *_descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()
    deadline = time.time() + 60
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids[1:]):
        assert time.time() < deadline, "the killed workers did not end"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _torchrun(config: Path, out: Path, *extra: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return [*launcher, "-m", "vlmtune", "train", str(config), f"train.output_dir={out}", *extra]


@pytest.mark.slow
def test_a_killed_sharded_run_resumes_to_the_same_end(runs, sharded):
    out = runs["tmp"] / "killed"
    extra = ("train.batch_size=1", "train.sharding=fsdp")
    proc = _launch(_torchrun(runs["config"], out, *extra))
    deadline = time.time() + 300
    while not (out / "checkpoint-2").is_dir():  # complete once renamed
        assert proc.poll() is None, f"the run ended before checkpoint-2:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "the run did not reach checkpoint-2 in time"
        time.sleep(0.02)
    _kill_tree(proc)
    assert not (out / "final").exists(), "the run ended before it was killed"
    newest = max((p for p in out.glob("checkpoint-*") if p.suffix != ".tmp"), key=lambda p: int(p.name.split("-")[1]))
    resumed = _run([str(runs["config"]), f"train.output_dir={out}", *extra, "train.resume=auto"], 2)
    assert f"resuming from {newest}" in resumed.stdout
    # The same processes, the same shards and the same float order: the resumed run ends where the uninterrupted
    # one ends, step by step (6 steps logged once each) and in its weights.
    _assert_same_steps(sharded, out, 6)
    assert _max_rel_diff(sharded / "final", out / "final") <= 1e-6
    # One process cannot take the two processes' shards: refused, naming what would work.
    one = subprocess.run(
        [sys.executable, "-m", "vlmtune", "train", str(runs["config"]), f"train.output_dir={out}", *extra]
        + ["train.resume=auto"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode != 0
    assert "resume it with 2 processes and train.sharding: fsdp" in one.stdout + one.stderr, one.stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_shards_too(runs):
    """``accelerate launch`` (here on CPU processes) starts the same sharded run as torchrun."""
    out = runs["tmp"] / "accelerate"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2"]
    launcher += [f"--main_process_port={_free_port()}", "-m", "vlmtune", "train", str(runs["config"])]
    done = subprocess.run(
        [*launcher, f"train.output_dir={out}", "train.batch_size=1", "train.sharding=fsdp"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sharding: fsdp over 2 processes" in done.stdout + done.stderr
    _assert_same_steps(runs["one"], out, 6)
    assert _max_rel_diff(runs["one"] / "final", out / "final") <= WEIGHTS_RTOL


@pytest.mark.slow
def test_two_nodes_on_one_machine_equal_one_process(runs):
    """``examples/accelerate/multi_node.yaml``'s layout: two nodes of one process each, meeting at the main node's
    address (here 127.0.0.1) with a static rendezvous, as ``accelerate launch --machine_rank N`` starts them."""
    out, port, sharding = runs["tmp"] / "nodes", _free_port(), "none"  # sharded runs: the tests above
    nodes = []
    for rank in (0, 1):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}"]
        launcher += ["--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
        args = [str(runs["config"]), f"train.output_dir={out}", "train.batch_size=1", f"train.sharding={sharding}"]
        nodes.append(_launch([*launcher, "-m", "vlmtune", "train", *args]))
    try:
        done = [node.communicate(timeout=300) for node in nodes]
    except subprocess.TimeoutExpired:
        for node in nodes:
            os.killpg(node.pid, signal.SIGKILL)
        pytest.fail("the two nodes did not finish in 300 s (hung?)")
    for node, (_, err) in zip(nodes, done):
        assert node.returncode == 0, err[-3000:]
    _assert_same_steps(runs["one"], out, 6)
    assert _max_rel_diff(runs["one"] / "final", out / "final") <= WEIGHTS_RTOL


def test_the_fsdp_example_gives_accelerate_an_fsdp2_plugin(monkeypatch):
    """``examples/accelerate/fsdp.yaml`` as ``accelerate launch`` passes it on: FSDP version 2 (no GPU here to run it)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    example = Path(__file__).parents[2] / "examples" / "accelerate" / "fsdp.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(example), "-m", "vlmtune", "train", "CONFIG"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    for key, value in env.items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"]
