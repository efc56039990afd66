"""The training recipe: config -> model -> trainability -> data -> optimizer -> loop -> outputs.

Reads top to bottom. accelerate places the model and data and synchronises processes, so
``accelerate launch -m vlmtune train CONFIG`` runs this same code unchanged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vlmtune.checkpoint import adapter_size, save_checkpoint
from vlmtune.config import Config, config_to_yaml
from vlmtune.data.collate import collate
from vlmtune.data.dataset import VLMDataset, build_dataset
from vlmtune.groups import assign_groups
from vlmtune.modeling import arch_for, load_model
from vlmtune.optim import build_optimizer, build_scheduler, describe, param_groups
from vlmtune.tracking import MetricsLog, echo, plot_loss
from vlmtune.tuning import apply_plan, build_plan, plan_table


@dataclass
class RunResult:
    """What a run produced."""

    output_dir: Path
    final_dir: Path
    steps: int
    first_eval_loss: float | None
    last_eval_loss: float | None
    last_loss: float | None


def make_loader(ds: VLMDataset, processor, batch_size: int, shuffle: bool, seed: int, workers: int) -> DataLoader:
    """A DataLoader with the padding collator; shuffling is seeded."""
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    video_token = getattr(processor, "video_token", None)
    fn = partial(collate, pad_id=pad_id, image_token_id=tok.convert_tokens_to_ids(processor.image_token),
                 video_token_id=tok.convert_tokens_to_ids(video_token) if video_token else None)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=fn, generator=gen, num_workers=workers)


@torch.no_grad()
def evaluate_loss(model, loader, accelerator) -> float:
    """Mean answer-token loss over the loader (weighted by answer tokens, gathered across processes)."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        out = model(**batch)
        n = (batch["labels"][:, 1:] != -100).sum()
        total += torch.stack([out.loss.double() * n, n.double()])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1].clamp(min=1))


def train(cfg: Config) -> RunResult:
    """Runs one fine-tuning job as configured and writes its outputs to ``cfg.train.output_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = cfg.train
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(gradient_accumulation_steps=t.grad_accum, log_with=t.report_to or None,
                              project_dir=str(out))
    set_seed(t.seed)
    if accelerator.is_main_process:
        (out / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
        (out / "metrics.jsonl").write_text("", encoding="utf-8")
    if t.report_to:
        accelerator.init_trackers("vlmtune")

    # Model and trainability: every parameter in one group, each group frozen, LoRA or full.
    model, processor = load_model(cfg.model, accelerator.device, echo=echo)
    gmap = assign_groups([n for n, _ in model.named_parameters()], arch_for(model, cfg.model))
    plans = build_plan(model, gmap, cfg)
    torch.manual_seed(t.seed)  # new LoRA weights depend on the seed only
    model = apply_plan(model, gmap, plans)
    echo(f"model: {type(model).__name__} ({gmap.arch.name}, layout {gmap.layout.name})")
    echo(plan_table(plans))

    # Data: samples that fit max_length, never cut inside an image.
    train_ds = build_dataset(cfg.data.train, cfg.data, processor, "train")
    eval_ds = build_dataset(cfg.data.eval, cfg.data, processor, "eval") if cfg.data.eval else None
    for name, ds in (("train", train_ds), ("eval", eval_ds)):
        if ds is not None:
            echo(f"{name} data: {len(ds)} samples")
            for line in ds.report.lines(cfg.data.max_length):
                echo(f"  {line}")
    if len(train_ds) == 0:
        raise ValueError("no training sample fits data.max_length; raise it or set data.too_long: downscale")
    loader = make_loader(train_ds, processor, t.batch_size, True, t.seed, cfg.data.num_workers)
    eval_loader = make_loader(eval_ds, processor, t.batch_size, False, t.seed, 0) if eval_ds else None

    # Optimizer: one parameter group per component (its own learning rate and weight decay).
    groups = param_groups(model, gmap, plans)
    for line in describe(groups):
        echo(line)
    optimizer = build_optimizer(groups, t.adam_betas)
    steps_per_epoch = max(1, math.ceil(len(loader) / accelerator.num_processes / t.grad_accum))
    total = t.max_steps or max(1, math.ceil(steps_per_epoch * t.epochs))
    warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * total)
    scheduler = build_scheduler(optimizer, t.scheduler, warmup, total)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    trainable = [p for g in groups for p in g["params"]]

    metrics = MetricsLog(out / "metrics.jsonl", accelerator)
    first_eval = last_eval = None
    if eval_loader is not None:
        first_eval = last_eval = evaluate_loss(model, eval_loader, accelerator)
        metrics.log({"step": 0, "eval_loss": first_eval})
        echo(f"eval loss before training: {first_eval:.4f}")

    # The loop.
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="train", disable=not (t.progress_bar and accelerator.is_main_process), dynamic_ncols=True)
    model.train()
    step, window_loss, window_n, window_samples, last_loss = 0, 0.0, 0, 0, None
    window_start = time.perf_counter()
    while step < total:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if t.max_grad_norm:
                        accelerator.clip_grad_norm_(trainable, t.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            window_loss += loss.detach().float().item()
            window_n += 1
            window_samples += batch["input_ids"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % t.logging_steps == 0 or step == total:
                elapsed = time.perf_counter() - window_start
                last_loss = window_loss / window_n
                record = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                          "samples_per_s": window_samples / max(elapsed, 1e-9)}
                record.update({f"lr/{g['name']}": lr for g, lr in zip(groups, scheduler.get_last_lr())})
                metrics.log(record)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}")
                window_loss, window_n, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
            if eval_loader is not None and t.eval_steps and step % t.eval_steps == 0 and step != total:
                last_eval = evaluate_loss(model, eval_loader, accelerator)
                metrics.log({"step": step, "eval_loss": last_eval})
            if t.save_steps and step % t.save_steps == 0 and step != total and accelerator.is_main_process:
                save_checkpoint(accelerator.unwrap_model(model), processor, cfg, out / f"checkpoint-{step}")
            if step >= total:
                break
    bar.close()

    if eval_loader is not None:
        last_eval = evaluate_loss(model, eval_loader, accelerator)
        metrics.log({"step": step, "eval_loss": last_eval})
        echo(f"eval loss after training: {last_eval:.4f} (before: {first_eval:.4f})")
    accelerator.wait_for_everyone()
    final = out / "final"
    if accelerator.is_main_process:
        save_checkpoint(accelerator.unwrap_model(model), processor, cfg, final)
        plot_loss(metrics.records, out / "loss.png")
        echo(f"wrote {final} ({adapter_size(final) / 1e6:.2f} MB of weights), {out / 'metrics.jsonl'}, {out / 'loss.png'}")
    accelerator.end_training()
    return RunResult(out, final, step, first_eval, last_eval, last_loss)
