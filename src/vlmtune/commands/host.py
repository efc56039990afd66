"""A CPU training process's own share of its memory, measured at run time rather than assumed.

``measure_host`` runs a child process that imports what ``vlmtune train`` imports, builds a small Qwen2-VL in code
(random weights, 18 MiB; LoRA on its language model; with 4-bit layers and gradient checkpointing where the run has
them), trains two steps on a short batch to warm its kernels, then eight on a longer one (each batch made afresh by
the processor, loss on the answer positions, clipping and AdamW, as the recipe's step), reading the kernel's peak
resident set (VmHWM, reset before the long steps). From that:

- **baseline**: the resident set before the long steps minus the small model's weights: the interpreter, torch and
  the libraries, with the code pages and thread pools a training step touches.
- **retention**: how much the resident set grew during the long steps per byte of a long step's live peak (torch's
  profiler counts the live bytes of one more step). glibc serves blocks up to its dynamic mmap threshold (at most
  32 MiB) from the heap and keeps freed ones for reuse, so a CPU step's resident activations exceed its live ones,
  more so with checkpointing, whose recomputed layers allocate again in every backward; an allocator that returns
  memory (jemalloc, tcmalloc) measures near 1. Two runs of the child differ by up to about 10%.

The result is kept in ``$VLMTUNE_CACHE/memory/`` per interpreter, library versions, dtype, attention kernel,
quantization, checkpointing, thread count and allocator settings: measured once per machine setup (about 20 s).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from vlmtune.model.peak import Host
from vlmtune.paths import cache_dir

PROBE = "import vlmtune.commands.train; from vlmtune.commands.host import probe; probe(*__import__('sys').argv[1:])"
WARM_TOKENS, TOKENS, STEPS = 64, 1024, 8


def _status(key: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS: resident now; VmHWM: its peak since the last reset)."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _reset_peak() -> bool:
    """Resets VmHWM to the current resident set (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _model_and_batches(dtype: str, attn: str, quantize: str, checkpointing: bool):
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import Qwen2VLForConditionalGeneration

    from vlmtune.model.tiny_qwen import build_processor, build_tokenizer, tiny_config

    corpus = [
        f"the {c} {s} is at the {p}" for c in ("red", "blue") for s in ("square", "circle") for p in ("top", "left")
    ]
    processor = build_processor(build_tokenizer(corpus))
    config = tiny_config(processor.tokenizer, text_hidden=256, text_layers=4, vision_dim=64, vision_depth=2)
    config.text_config.intermediate_size = 1024
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).to(getattr(torch, dtype))
    if quantize != "none":  # the language model's linear layers quantized, as model.quantize loads them
        from transformers import BitsAndBytesConfig

        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            q = BitsAndBytesConfig(
                load_in_8bit=quantize == "int8",
                load_in_4bit=quantize != "int8",
                bnb_4bit_quant_type=quantize if quantize != "int8" else "nf4",
                bnb_4bit_compute_dtype=getattr(torch, dtype),
                llm_int8_skip_modules=["visual", "lm_head"],
            )
            model = Qwen2VLForConditionalGeneration.from_pretrained(
                tmp, quantization_config=q, dtype=getattr(torch, dtype)
            )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=r".*language_model.*\.(q|k|v|o|gate|up|down)_proj")
    if checkpointing:  # as build_model turns it on
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora)

    def batch(tokens: int) -> dict:
        """Two rows of an image and ``tokens`` text tokens, the last 32 labelled, made afresh each time."""
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "where is it"}]}]
        text = processor.apply_chat_template(chat, add_generation_prompt=True) + " top" * tokens
        out = dict(processor(text=[text, text], images=[Image.new("RGB", (64, 64))] * 2, return_tensors="pt"))
        out["labels"] = out["input_ids"].clone()
        out["labels"][:, :-32] = -100
        out["pixel_values"] = out["pixel_values"].to(getattr(torch, dtype))
        return out

    return model, batch


def probe(
    out: str, dtype: str = "float32", attn: str = "sdpa", quantize: str = "none", checkpointing: str = ""
) -> None:
    """The child's side: writes {baseline, retention, ...} (bytes) to ``out``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vlmtune.train.loss import answer_loss

    model, batch = _model_and_batches(dtype, attn, quantize, checkpointing == "checkpointing")
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained)

    def step(tokens: int) -> None:  # as the recipe's step: a fresh batch, answer-only logits, clipping
        loss = answer_loss(model, batch(tokens))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    for _ in range(2):
        step(WARM_TOKENS)
    before = _status("VmRSS")
    if not _reset_peak():
        raise RuntimeError("cannot reset the peak resident set (/proc/self/clear_refs)")
    for _ in range(STEPS):
        step(TOKENS)
    peak = _status("VmHWM")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(TOKENS)
    live = top = 0
    for _, n in sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    ):
        live += n
        top = max(top, live)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # quantized ones packed
    grown = max(0, peak - before)
    result = {
        "baseline": before - weights,
        "retention": max(1.0, grown / top) if top else 1.0,
        "heap_growth": grown,
        "live_peak": top,
        "probe_weights": weights,
    }
    Path(out).write_text(json.dumps(result), encoding="utf-8")


def _key(dtype: str, attn: str, quantize: str, checkpointing: bool) -> str:
    import peft
    import torch
    import transformers

    from vlmtune import __version__

    parts = [
        sys.executable,
        platform.python_version(),
        torch.__version__,
        transformers.__version__,
        peft.__version__,
        __version__,
        dtype,
        attn,
        quantize,
        str(checkpointing),
        str(torch.get_num_threads()),
        *(
            f"{k}={v}"
            for k, v in sorted(os.environ.items())
            if k.startswith(("MALLOC_", "LD_PRELOAD", "GLIBC_TUNABLES"))
        ),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def measure_host(
    dtype: str = "float32", attn: str = "sdpa", quantize: str = "none", checkpointing: bool = False, echo=print
) -> Host:
    """The CPU process's baseline and the heap's retention, from the cache or measured now by a child process.

    Raises:
        RuntimeError: the child failed (its output's end is in the message).
    """
    path = cache_dir() / "memory" / f"host-{_key(dtype, attn, quantize, checkpointing)}.json"
    if not path.is_file():
        echo("memory: measuring this machine's process baseline and heap retention once (a child process, ~20 s) ...")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(
            [sys.executable, "-c", PROBE, str(tmp), dtype, attn, quantize, "checkpointing" if checkpointing else ""],
            capture_output=True,
            text=True,
            env=env,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the memory probe failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        tmp.replace(path)
    got = json.loads(path.read_text(encoding="utf-8"))
    how = (
        f"measured in a child process that imports vlmtune's train command and trains a {got['probe_weights'] / 2**20:.0f} "
        f"MiB Qwen2-VL; cached in {path.parent}"
    )
    return Host(baseline=int(got["baseline"]), retention=float(got["retention"]), how=how)
