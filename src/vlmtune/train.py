"""The training recipe: config -> model -> trainability -> data -> for each stage: optimizer, loop, checkpoint.

Reads top to bottom: ``train`` sets up the run (or resumes it), ``run_stage`` trains one stage. accelerate
places the model and data and synchronises processes, so ``accelerate launch -m vlmtune train CONFIG``
runs this same code unchanged.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from vlmtune.checkpoint import TMP_SUFFIX, adapter_size, begin, commit, prune, save_checkpoint, write_model
from vlmtune.checks import check_gradients, group_grad_norms, inner_model
from vlmtune.config import BUILTIN_MODEL, Config, ConfigError, config_to_yaml
from vlmtune.data.collate import collate
from vlmtune.data.dataset import VLMDataset, build_dataset, cache_dir
from vlmtune.distributed import all_finite, any_process, build_base_alone, gathered_state_dict, sharded_engine, token_share
from vlmtune.evaluate import evaluate_model, plot_metrics, report_table
from vlmtune.groups import GroupMap, assign_groups
from vlmtune.loss import answer_loss
from vlmtune.modeling import arch_for, load_model
from vlmtune.optim import build_optimizer, build_scheduler, describe, param_groups
from vlmtune.packing import pack, rope_index_of
from vlmtune.resume import (Progress, TrainerState, load_trainable, prepare_output_dir, read_state, restore_rng, write_rng,
                            write_state)
from vlmtune.sampler import EpochSampler
from vlmtune.stages import Stage, resolve_stages
from vlmtune.stopping import GRADIENT_FLOW_EXIT, NONFINITE_EXIT, RunStopped, StopSignals, stop_requested
from vlmtune.tracking import MetricsLog, echo, plot_loss
from vlmtune.tuning import GroupPlan, build_plan, plan_table, set_trainable, union_plans, wrap
from vlmtune.vision_cache import CACHED, ImageKeys, VisionCache, fill, fingerprint, install, missing_images, unavailable


@dataclass
class RunResult:
    """What a run produced."""

    output_dir: Path
    final_dir: Path
    steps: int
    first_eval_loss: float | None
    last_eval_loss: float | None
    last_loss: float | None
    stage_dirs: list[Path] = field(default_factory=list)


@dataclass
class Run:
    """What every stage of a run shares."""

    cfg: Config
    accelerator: object
    out: Path
    processor: object
    gmap: GroupMap
    metrics: MetricsLog
    run_params: set[str]  # parameters any stage trains: the weights a resume state holds
    last_checkpoint: Path | None = None
    first_eval: float | None = None
    last_eval: float | None = None
    last_loss: float | None = None
    cache: VisionCache | None = None  # frozen vision-tower features on disk, when valid for the run
    image_keys: ImageKeys | None = None  # the cache's keys of image files (with the cache)
    rope_index: Callable | None = None  # the model's M-RoPE positions of a padded batch (for packing), when it has them


def loader_workers(setting: int | str, processes: int = 1) -> int:
    """``data.num_workers``: a number as given; ``auto`` is 0 without CUDA (on a CPU run the workers would compete
    with the training threads) and otherwise min(4, cores per process - 1)."""
    if setting != "auto":
        return int(setting)
    if not torch.cuda.is_available():
        return 0
    return max(0, min(4, len(os.sched_getaffinity(0)) // max(1, processes) - 1))


def make_loader(ds: VLMDataset, processor, batch_size: int, shuffle: bool, seed: int, workers: int,
                group_by_length: bool = False, packing: bool = False, pack_length: int | None = None) -> DataLoader:
    """A DataLoader with the padding collator; its order depends only on (seed, epoch) (see EpochSampler).
    With workers, batches are prepared ahead of the step (2 per worker) in pinned memory on a GPU machine.
    With ``packing`` each batch's samples come in packed-row order (see vlmtune.packing)."""
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    video_token = getattr(processor, "video_token", None)
    fn = partial(collate, pad_id=pad_id, image_token_id=tok.convert_tokens_to_ids(processor.image_token),
                 video_token_id=tok.convert_tokens_to_ids(video_token) if video_token else None, pack=packing,
                 pack_length=pack_length)
    sampler = EpochSampler(len(ds), seed, shuffle, ds.lengths() if group_by_length else None, batch_size)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=fn, num_workers=workers,
                      pin_memory=workers > 0 and torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def evaluate_loss(model, loader, accelerator) -> float:
    """Mean answer-token loss over the loader (weighted by answer tokens, gathered across processes)."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        loss = answer_loss(model, batch)
        n = (batch["labels"][:, 1:] != -100).sum()
        total += torch.stack([loss.double() * n, n.double()])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1].clamp(min=1))


def train(cfg: Config) -> RunResult:
    """Runs a fine-tuning job (every stage, in order) and writes its outputs to ``cfg.train.output_dir``.

    Raises:
        RunStopped: a signal asked the run to stop (a checkpoint was written) or the loss became non-finite.
        ConfigError: the plan is invalid, or a resume would mix runs with different settings.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = cfg.train
    out = Path(t.output_dir)
    from accelerate.utils import DistributedDataParallelKwargs

    # find_unused_parameters: a process whose batch has no image never runs the vision path; without it DDP
    # waits forever for those gradients (other tools hang exactly there).
    # cpu=True where there is no GPU: accelerate only forms a multi-process (gloo) group on CPU when told so.
    accelerator = Accelerator(gradient_accumulation_steps=t.grad_accum, log_with=t.report_to or None,
                              project_dir=str(out), cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(t.seed)
    stages = resolve_stages(cfg)
    resume_from = prepare_output_dir(out, cfg, stages, accelerator)
    if accelerator.is_main_process:
        (out / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")

    # Model and trainability: every parameter in one group; each stage makes each group frozen, LoRA or full.
    # LoRA that trains in any stage is injected now (B = 0 until it trains), so adapters carry over.
    if accelerator.num_processes > 1 and cfg.model.path == BUILTIN_MODEL:
        if accelerator.is_main_process:
            build_base_alone()
        accelerator.wait_for_everyone()
    model, processor = load_model(cfg.model, accelerator.device, echo=echo)
    if t.gradient_checkpointing:  # non-reentrant: correct with frozen inputs, no need for input gradients
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        echo("gradient checkpointing: on (layer activations are recomputed in the backward)")
    gmap = assign_groups([n for n, _ in model.named_parameters()], arch_for(model, cfg.model))
    stage_plans = [build_plan(model, gmap, s.cfg) for s in stages]
    union = union_plans(stage_plans)
    torch.manual_seed(t.seed)  # new LoRA weights depend on the seed only
    model = wrap(model, union)
    set_trainable(model, gmap, union)
    run_params = {n for n, p in model.named_parameters() if p.requires_grad}
    echo(f"model: {type(model).__name__} ({gmap.arch.name}, layout {gmap.layout.name})")
    cache = open_vision_cache(cfg, stages, model, gmap, union)
    rope_index = rope_index_of(inner_model(model))  # the config check already limits packing to M-RoPE families
    if any(s.cfg.train.packing for s in stages):
        if rope_index is None:
            raise ConfigError([f"'train.packing': {type(inner_model(model)).__name__} has no get_rope_index; set train.packing: false"])
        echo(f"packing: on (samples end to end in rows, positions restarting per sample; "
             f"{model.config._attn_implementation} attention)")

    progress, state = Progress(), None
    if resume_from is not None:
        state = read_state(resume_from, accelerator.process_index)
        load_trainable(model, state, run_params)
        progress = state.progress
        echo(f"resuming from {resume_from}: stage {progress.stage_index + 1}/{len(stages)}, "
             f"{progress.stage_step} steps into it, run step {progress.global_step}")
    metrics = MetricsLog(out / "metrics.jsonl", accelerator, keep=progress.metrics_lines)
    if t.report_to:
        accelerator.init_trackers("vlmtune")
    run = Run(cfg, accelerator, out, processor, gmap, metrics, run_params, last_checkpoint=resume_from, cache=cache,
              image_keys=ImageKeys(processor) if cache is not None else None, rope_index=rope_index)

    stage_dirs = []
    with StopSignals() as signals:
        for stage, plans in zip(stages, stage_plans):
            if stage.index >= progress.stage_index:
                resuming = state if state is not None and progress.stage_step > 0 else None
                model = run_stage(run, model, stage, len(stages), plans, progress, resuming, signals)
                state = None
            if stage.named:
                stage_dirs.append(out / stage.name)

    accelerator.wait_for_everyone()
    final = out / "final"
    state_dict = gathered_state_dict(accelerator, model)
    if accelerator.is_main_process:
        save_checkpoint(accelerator.unwrap_model(model), processor, cfg, final, state_dict)
        plot_loss(metrics.records, out / "loss.png")
        if any(k.startswith("eval/") for r in metrics.records for k in r):
            plot_metrics(out / "metrics.jsonl", out / "metrics.png")
        echo(f"wrote {final} ({adapter_size(final) / 1e6:.2f} MB of weights), {out / 'metrics.jsonl'}, {out / 'loss.png'}")
    accelerator.end_training()
    return RunResult(out, final, progress.global_step, run.first_eval, run.last_eval, run.last_loss, stage_dirs)


def run_stage(run: Run, model, stage: Stage, n_stages: int, plans: list[GroupPlan], progress: Progress,
              state: TrainerState | None, signals: StopSignals):
    """Trains one stage: its trainable groups, data, optimizer and schedule; writes its folder at the end."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    cfg, t, acc = stage.cfg, stage.cfg.train, run.accelerator
    unwrapped = acc.unwrap_model(model)
    set_trainable(unwrapped, run.gmap, plans)
    if progress.stage_step == 0:
        progress.epoch = progress.batch_in_epoch = 0
        progress.stage_start_step[stage.name] = progress.global_step
        run.metrics.log({"step": progress.global_step, "stage_start": stage.name})
    progress.stage_name = stage.name
    trained = [f"{p.group} ({p.mode})" for p in plans if p.mode != "frozen"]
    frozen = [p.group for p in plans if p.mode == "frozen"]
    echo(f"\nstage {stage.index + 1}/{n_stages} '{stage.name}': trains {', '.join(trained)}; frozen: {', '.join(frozen) or '-'}")
    echo(plan_table(plans))

    # Data: samples that fit max_length, never cut inside an image.
    train_ds = build_dataset(cfg.data.train, cfg.data, run.processor, "train")
    eval_ds = build_dataset(cfg.data.eval, cfg.data, run.processor, "eval") if cfg.data.eval else None
    for name, ds in (("train", train_ds), ("eval", eval_ds)):
        if ds is not None:
            echo(f"{name} data: {len(ds)} samples")
            for line in ds.report.lines(cfg.data.max_length):
                echo(f"  {line}")
    if acc.is_main_process:
        report = {"train": train_ds.report.to_dict(), "eval": eval_ds.report.to_dict() if eval_ds else None}
        name = f"data_report-{stage.name}.json" if stage.named else "data_report.json"
        (run.out / name).write_text(json.dumps(report, indent=1), encoding="utf-8")
    if len(train_ds) == 0:
        raise ValueError("no training sample fits data.max_length; raise it or set data.too_long: downscale")
    workers = loader_workers(cfg.data.num_workers, acc.num_processes)
    loader = make_loader(train_ds, run.processor, t.batch_size, True, t.seed, workers, t.group_by_length, t.packing,
                         t.packing_length)
    sampler = loader.sampler
    eval_loader = make_loader(eval_ds, run.processor, t.batch_size, False, t.seed, 0) if eval_ds else None
    if run.cache is not None:
        train_ds.use_vision_cache(run.image_keys, run.cache)  # batches carry cached features and grids, no pixels
        fill_vision_cache(run, unwrapped, train_ds, t.batch_size)

    # Optimizer: one parameter group per component (its own learning rate and weight decay), new each stage.
    groups = param_groups(unwrapped, run.gmap, plans)
    for line in describe(groups):
        echo(line)
    optimizer = build_optimizer(groups, t.adam_betas)
    steps_per_epoch = max(1, math.ceil(len(loader) / acc.num_processes / t.grad_accum))
    total = t.max_steps or max(1, math.ceil(steps_per_epoch * t.epochs))
    warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * total)
    scheduler = build_scheduler(optimizer, t.scheduler, warmup, total)
    acc.free_memory()  # a stage changes what trains: wrap the model afresh (DDP registers trainable parameters once)
    model, optimizer, loader = acc.prepare(unwrapped, optimizer, loader)
    if eval_loader is not None:
        eval_loader = acc.prepare(eval_loader)
    trainable = [p for g in groups for p in g["params"]]
    if state is not None:
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)

    if eval_loader is not None and progress.global_step == 0:
        run.first_eval = run.last_eval = evaluate(run, model, eval_loader, eval_ds, cfg, stage, progress, show=True)
        echo(f"eval loss before training: {run.first_eval:.4f}")
    before = fingerprints(unwrapped, run.run_params)
    # The random streams (dropout) continue from the checkpoint, or start from the seed at a stage's start.
    restore_rng(state.rng_file) if state is not None else set_seed(t.seed + stage.index)

    # The loop.
    bar = tqdm(total=total, initial=progress.stage_step, desc=stage.name,
               disable=not (t.progress_bar and acc.is_main_process), dynamic_ncols=True)
    model.train()
    window_loss, window_n, window_samples, bad_window, grad_norms = 0.0, 0, 0, False, {}
    flow_checked, window_images = not t.check_gradient_flow, 0
    window_tokens = torch.zeros(3)  # real, padded-to and answer token counts (padding fraction, tokens logged)
    window_start = time.perf_counter()
    while progress.stage_step < total:
        sampler.start = progress.batch_in_epoch * t.batch_size * acc.num_processes
        loader.set_epoch(progress.epoch)
        train_ds.set_epoch(progress.epoch)  # augmentation draws depend on (seed, sample, epoch)
        for batch in loader:
            progress.batch_in_epoch += 1
            window_images += int("pixel_values" in batch or CACHED in batch)
            inputs = pack(batch, run.rope_index) if t.packing else batch
            window_tokens += torch.tensor([batch["attention_mask"].sum().item(), inputs["input_ids"].numel(),
                                           (batch["labels"] != -100).sum().item()])
            with acc.accumulate(model):
                loss = answer_loss(model, inputs, t.label_only_logits)
                value = loss.detach().float()
                if acc.num_processes > 1:
                    loss = loss * token_share(batch, acc)
                if all_finite(value, acc):
                    acc.backward(loss)
                    window_loss += value.item()
                    window_n += 1
                elif not bad_window:  # one count per optimizer step, however many micro-batches are bad
                    nonfinite(run, stage, progress, f"loss {value.item()}")
                    bad_window = True
                window_samples += batch["input_ids"].shape[0] * acc.num_processes
                if acc.sync_gradients:
                    if not flow_checked and not bad_window and any_process(window_images > 0, acc):
                        check_flow(run, model, plans, stage)  # needs an image: text-only batches never reach the projector
                        flow_checked = True
                    window_images = 0
                    if (progress.stage_step + 1) % t.logging_steps == 0 or progress.stage_step + 1 == total:
                        grad_norms = group_grad_norms(acc.unwrap_model(model), run.gmap)
                    norm = acc.clip_grad_norm_(trainable, t.max_grad_norm) if t.max_grad_norm else None
                    if not bad_window and norm is not None and not all_finite(norm.detach().float(), acc):
                        nonfinite(run, stage, progress, f"gradient norm {norm.item()}")
                        bad_window = True
                    if not bad_window:
                        optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if not acc.sync_gradients:
                continue
            progress.stage_step += 1
            progress.global_step += 1
            bad_window = False
            bar.update(1)
            step = progress.stage_step
            if step % t.logging_steps == 0 or step == total:
                sums = torch.tensor([window_loss, window_n, *window_tokens.tolist()], dtype=torch.float64, device=acc.device)
                if acc.num_processes > 1:  # the logged loss and token counts are over every process's micro-batches
                    sums = acc.reduce(sums, reduction="sum")
                if sums[1] > 0:
                    elapsed = time.perf_counter() - window_start
                    run.last_loss = float(sums[0] / sums[1])
                    record = {"step": progress.global_step, "stage": stage.name, "loss": run.last_loss,
                              "lr": scheduler.get_last_lr()[0], "samples_per_s": window_samples / max(elapsed, 1e-9)}
                    record.update({f"lr/{g['name']}": lr for g, lr in zip(groups, scheduler.get_last_lr())})
                    record.update(tokens=int(sums[2]), answer_tokens=int(sums[4]),
                                  padding=1.0 - float(sums[2] / sums[3].clamp(min=1)))
                    record.update({f"grad_norm/{group}": value for group, value in grad_norms.items()})
                    if progress.nonfinite_skips:
                        record["nonfinite_skips"] = progress.nonfinite_skips
                    run.metrics.log(record)
                    bar.set_postfix(loss=f"{run.last_loss:.4f}", lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}")
                window_loss, window_n, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
                window_tokens.zero_()
            if eval_loader is not None and t.eval_steps and step % t.eval_steps == 0 and step != total:
                run.last_eval = evaluate(run, model, eval_loader, eval_ds, cfg, stage, progress)
            if t.save_steps and step % t.save_steps == 0 and step != total:
                save_resumable(run, model, run.out / f"checkpoint-{progress.global_step}", progress, optimizer, scheduler)
            if stop_requested(signals, acc):
                folder = save_resumable(run, model, run.out / f"checkpoint-{progress.global_step}", progress, optimizer, scheduler)
                name = signal.Signals(signals.signum or signal.SIGTERM).name
                raise RunStopped(f"stopped by {name} at stage '{stage.name}' step {step}/{total} (run step "
                                 f"{progress.global_step}); saved {folder}. Run the same command with --resume "
                                 "to continue from there.", 128 + (signals.signum or signal.SIGTERM))
            if step >= total:
                break
        else:
            progress.epoch += 1
            progress.batch_in_epoch = 0
    bar.close()

    if eval_loader is not None:
        run.last_eval = evaluate(run, model, eval_loader, eval_ds, cfg, stage, progress, show=True)
        echo(f"eval loss after stage '{stage.name}': {run.last_eval:.4f}"
             + (f" (before training: {run.first_eval:.4f})" if run.first_eval is not None else ""))
    report_changes(run, stage, plans, before, fingerprints(unwrapped, run.run_params), progress)
    progress.stage_index, progress.stage_step = stage.index + 1, 0
    progress.epoch = progress.batch_in_epoch = 0
    if stage.named:
        save_resumable(run, model, run.out / stage.name, progress, None, None)
    return model


def open_vision_cache(cfg: Config, stages: list[Stage], model, gmap: GroupMap, union: list[GroupPlan]) -> VisionCache | None:
    """The run's vision-feature cache when it is valid (the tower trains in no stage, no augmentation), else None."""
    base = inner_model(model)
    vision_trains = next(p for p in union if p.group == "vision_tower").mode != "frozen"
    augment = any(s.cfg.data.augment.enabled for s in stages)
    why = unavailable(base.config.model_type, vision_trains, augment, cfg.train.vision_cache)
    if why is not None:
        echo(f"vision cache: off ({why})")
        return None
    tower = [n for n, p in base.named_parameters() if gmap.group_of(n) == "vision_tower"]
    projector = base.get_submodule(gmap.layout.patterns["projector"][0])
    cache = VisionCache(cache_dir() / "vision", fingerprint(base, tower), inner=base.model, projector=projector)
    install(cache.inner, projector)
    echo(f"vision cache: on ({cache.dir}); the frozen vision tower runs once per image, then only the projector")
    return cache


def fill_vision_cache(run: Run, model, ds: VLMDataset, batch_size: int) -> None:
    """Computes the features of the stage's training images that the cache lacks (main process; others wait)."""
    from tqdm.auto import tqdm

    from vlmtune.data.collate import load_image, process_images

    acc = run.accelerator
    base = inner_model(model)
    if acc.is_main_process:
        todo, found = missing_images(ds, run.image_keys, run.cache)
        vision = base.config.vision_config
        width = getattr(vision, "embed_dim", None) or vision.hidden_size  # the tower's output = the projector's input
        size = sum(patches for _, _, patches in todo.values()) * width * next(base.parameters()).element_size()
        echo(f"vision cache: {len(todo)} image(s) to compute (about {size / 2**20:.1f} MiB), {found} already cached")

        def pixels():
            for key, (path, max_pixels, _) in todo.items():
                yield key, process_images(run.processor, [load_image(path, path)], ds.data.image_min_pixels, max_pixels)

        was_training = run.cache.inner.training
        run.cache.inner.eval()
        bar = tqdm(pixels(), total=len(todo), desc="vision cache", dynamic_ncols=True,
                   disable=not run.cfg.train.progress_bar or not todo)
        computed = fill(run.cache, run.cache.inner, run.cache.projector, bar, acc.device, images_per_pass=batch_size)
        run.cache.inner.train(was_training)
        if todo:
            echo(f"vision cache: {computed} image(s) computed")
    acc.wait_for_everyone()


def evaluate(run: Run, model, eval_loader, eval_ds: VLMDataset, cfg: Config, stage: Stage, progress: Progress,
             show: bool = False) -> float:
    """Answer loss over the whole eval set (all processes), plus language and alignment metrics on
    ``eval.samples`` of it (main process); logged as one record. Returns the loss."""
    acc = run.accelerator
    loss = evaluate_loss(model, eval_loader, acc)
    record = {"step": progress.global_step, "stage": stage.name, "eval_loss": loss}
    if acc.is_main_process:
        record.update(evaluate_model(model, run.processor, eval_ds, cfg.eval, accelerator=acc, arch=run.gmap.arch))
        if show:
            echo(report_table(record))
    run.metrics.log(record)
    acc.wait_for_everyone()
    return loss


def check_flow(run: Run, model, plans: list[GroupPlan], stage: Stage) -> None:
    """The first step's gradients reach every trained group and no frozen one, or the run stops naming it."""
    result = check_gradients(run.accelerator.unwrap_model(model), run.gmap, plans)
    if not result.ok:
        raise RunStopped(f"stage '{stage.name}', first step: {result}\n  (`vlmtune doctor CONFIG` runs the same check "
                         "without training; train.check_gradient_flow: false skips it)", GRADIENT_FLOW_EXIT)
    echo(str(result))


def save_resumable(run: Run, model, folder: Path, progress: Progress, optimizer, scheduler) -> Path:
    """Writes a loadable checkpoint plus everything a resume needs, atomically; every process takes part
    (each writes its own RNG state), the main process writes the rest and renames."""
    acc = run.accelerator
    progress.metrics_lines = len(run.metrics.records)
    tmp = folder.with_name(folder.name + TMP_SUFFIX)
    sharded = sharded_engine(acc)
    if acc.is_main_process:
        begin(folder)
    acc.wait_for_everyone()
    if not sharded:
        write_rng(tmp, acc.process_index)
    state_dict = gathered_state_dict(acc, model)
    acc.wait_for_everyone()
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        write_model(unwrapped, run.processor, run.cfg, tmp, state_dict)
        if sharded:  # optimizer states are sharded across processes there; vlmtune does not gather them yet
            echo(f"note: {folder.name} holds the weights but no resume state ({sharded} shards the optimizer)")
        else:
            weights = {n: p for n, p in unwrapped.named_parameters() if n in run.run_params}
            write_state(tmp, progress, weights, optimizer, scheduler)
        commit(tmp, folder)
        for p in prune(run.out, run.cfg.train.save_total_limit):
            echo(f"removed {p.name} (train.save_total_limit={run.cfg.train.save_total_limit})")
    acc.wait_for_everyone()
    run.last_checkpoint = folder
    return folder


def nonfinite(run: Run, stage: Stage, progress: Progress, what: str) -> None:
    """Stops the run (default) or counts a skipped step; never writes over the last good checkpoint."""
    t = run.cfg.train
    where = f"stage '{stage.name}', step {progress.stage_step + 1} (run step {progress.global_step + 1})"
    last = str(run.last_checkpoint) if run.last_checkpoint else "none (no checkpoint was written yet)"
    if t.on_nonfinite == "skip" and progress.nonfinite_skips < t.max_nonfinite_skips:
        progress.nonfinite_skips += 1
        echo(f"warning: non-finite {what} at {where}; step skipped ({progress.nonfinite_skips} of at most "
             f"{t.max_nonfinite_skips}, train.max_nonfinite_skips)")
        return
    why = "" if t.on_nonfinite == "stop" else f" after {progress.nonfinite_skips} skipped steps (train.max_nonfinite_skips)"
    raise RunStopped(f"non-finite {what} at {where}{why}. Stopped; nothing was saved after the last good checkpoint: "
                     f"{last}\n  Lower the learning rate or check the data, then resume with --resume, or set "
                     "train.on_nonfinite: skip",
                     NONFINITE_EXIT)


@torch.no_grad()
def fingerprints(model, names: set[str]) -> dict[str, tuple[float, float, int]]:
    """(sum, sum of squares, size) per parameter, in float64: enough to tell which tensors a stage changed."""
    return {n: (p.double().sum().item(), p.double().square().sum().item(), p.numel())
            for n, p in model.named_parameters() if n in names}


def report_changes(run: Run, stage: Stage, plans: list[GroupPlan], before: dict, after: dict, progress: Progress) -> None:
    """Logs, per group, how many of the run's trainable tensors and parameters this stage changed."""
    record = {"step": progress.global_step, "stage_end": stage.name}
    for plan in plans:
        names = [n for n in before if run.gmap.group_of(n) == plan.group]
        if not names:
            continue
        changed = [n for n in names if before[n] != after[n]]
        n_params = sum(after[n][2] for n in changed)
        record[f"changed_params/{plan.group}"] = n_params
        echo(f"stage '{stage.name}': {plan.group} ({plan.mode}) changed {len(changed)} of {len(names)} tensors "
             f"({n_params:,} parameters)")
    run.metrics.log(record)
