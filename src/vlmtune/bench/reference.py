"""The benchmark's reference: a plain transformers + peft LoRA loop, written the way their docs show.

No tricks: ``AutoModelForImageTextToText`` + ``AutoProcessor``, ``get_peft_model`` with a ``LoraConfig``, the
processor's chat template and ``processor(text=..., images=..., padding=True)`` in a DataLoader collate function,
labels on the answer only, ``model(**batch).loss``, ``backward``, ``clip_grad_norm_``, ``AdamW.step``. It is
given exactly what vlmtune's run is given (see ``vlmtune.bench.command``): the same model folder, dtype, attention kernel,
LoRA rank/alpha/targets (every language-model linear layer and the projector's ``mlp.0``/``mlp.2``), learning
rate, betas, clipping, seed, batch size and the same samples in the same order. The LoRA weights are created on
the CPU after ``torch.manual_seed(seed)``, as vlmtune does, so both start from the same adapter.

Run as a child of ``vlmtune bench``: ``python -m vlmtune.bench.reference SPEC.json`` (the spec names the
inputs and where the per-step results go). Single-turn samples only (the benchmark's data).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

# peft matches a string ``target_modules`` as a full regex over module names.
TARGETS = (
    r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    r"|model\.visual\.merger\.mlp\.(0|2)"
)


class ShareGPT(Dataset):
    """A ShareGPT JSONL file: each item is (chat messages with image parts, PIL images)."""

    def __init__(self, path: Path):
        self.root = path.parent
        self.rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        chat = []
        for m in row["messages"]:
            parts = []
            for k, piece in enumerate(m["content"].split("<image>")):
                if k:
                    parts.append({"type": "image"})
                if piece:
                    parts.append({"type": "text", "text": piece})
            chat.append({"role": m["role"], "content": parts})
        return chat, [Image.open(self.root / p).convert("RGB") for p in row["images"]]


def make_collate(processor):
    """Batches with the processor; labels are the final assistant answer (with its end-of-turn) and -100 elsewhere."""
    tok = processor.tokenizer

    def collate(examples):
        texts = [processor.apply_chat_template(chat, tokenize=False) for chat, _ in examples]
        images = [im for _, ims in examples for im in ims]
        batch = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        labels = torch.full_like(batch["input_ids"], -100)
        for i, (chat, _) in enumerate(examples):
            prompt = processor.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
            answer = len(tok(texts[i][len(prompt) :], add_special_tokens=False)["input_ids"])
            end = int(batch["attention_mask"][i].sum())  # right padding: the answer ends the real tokens
            labels[i, end - answer : end] = batch["input_ids"][i, end - answer : end]
        batch["labels"] = labels
        return batch

    return collate


def run(spec: dict) -> dict:
    """Trains ``spec["steps"]`` steps and returns the per-step timings, losses and token counts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForImageTextToText.from_pretrained(
        spec["model"], dtype=getattr(torch, spec["dtype"]), attn_implementation="sdpa"
    )
    processor = AutoProcessor.from_pretrained(spec["model"])
    torch.manual_seed(spec["seed"])
    lora = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules=TARGETS, bias="none")
    model = get_peft_model(model, lora).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.999), weight_decay=0.0)
    loader = DataLoader(
        ShareGPT(Path(spec["data"])),
        batch_size=spec["batch_size"],
        sampler=spec["order"],
        collate_fn=make_collate(processor),
    )
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    model.train()
    steps = []
    last = time.perf_counter()
    for batch in loader:
        batch = batch.to(device)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        steps.append(
            {
                "s": now - last,
                "loss": value,
                "samples": int(batch["input_ids"].shape[0]),
                "tokens": int(batch["attention_mask"].sum()),
                "image_tokens": int((batch["input_ids"] == image_id).sum()),
                "label_tokens": int((batch["labels"] != -100).sum()),
            }
        )
        last = now
        if len(steps) == spec["steps"]:
            break
    lora_modules = sorted(
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
    )
    return {
        "steps": steps,
        "lora_modules": lora_modules,
        "trainable_params": sum(p.numel() for p in params),
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = run(spec)
    Path(spec["out"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
