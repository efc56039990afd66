"""The training recipe: config -> model -> trainability -> data -> for each stage: optimizer, loop, checkpoint.

Reads top to bottom. ``train`` sets up the run (or resumes it) and runs its stages; a stage is
``prepare_stage`` (plan, data, optimizer, schedule), the loop of ``train_step`` (one micro-batch) and
``after_step`` (logging, evaluation, saving, stopping) per optimizer step, then ``finish_stage``. The loss comes
from the run's objective (``vlmtune.train.sft``), so another method plugs in with its own loss and batch.
accelerate places the model and data and synchronises processes, so ``accelerate launch -m vlmtune train CONFIG``
runs this same code unchanged.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

from accelerate.utils import set_seed
from tqdm.auto import tqdm

from vlmtune.checks import group_grad_norms, inner_model
from vlmtune.config.load import config_to_yaml
from vlmtune.config.schema import Config
from vlmtune.config.stages import Stage, resolve_stages
from vlmtune.eval.evaluate import plot_metrics
from vlmtune.model.build import BuiltModel, build_model
from vlmtune.model.load import ModelFolder, local_folder
from vlmtune.model.tuning import GroupPlan, activate
from vlmtune.report.page import report_at_run_end
from vlmtune.tracking import MetricsLog, echo, plot_loss
from vlmtune.train.checkpoint import adapter_size
from vlmtune.train.distributed import all_finite, any_process, clip_gradients, make_accelerator, prepare
from vlmtune.train.evaluation import check_stage_generation, evaluate_stage
from vlmtune.train.loader import (
    StageData,
    load_stage_data,
    loader_workers,
    make_loader,
    train_mix,
    write_data_report,
)
from vlmtune.train.logps import share_vision_rows
from vlmtune.train.objectives import ROW_METHODS, batch_has_vision, batch_samples, make_objective
from vlmtune.train.optim import build_optimizer, build_scheduler, param_groups
from vlmtune.train.output_dir import OutputLock, clear_earlier_run, find_resume_point
from vlmtune.train.packing import rope_index_of
from vlmtune.train.reading import take_notes, vision_cache_applies
from vlmtune.train.report import announce, announce_mix, fingerprints, report_changes
from vlmtune.train.resume import Progress, TrainerState, load_trainable, read_state, restore_rng
from vlmtune.train.run import Run, RunResult, StageRun
from vlmtune.train.saving import check_convertible, save_final, save_resumable
from vlmtune.train.sft import SFT
from vlmtune.train.sharding import shard_model, sharding
from vlmtune.train.stopping import (
    RunStopped,
    StopSignals,
    stop_for_nonfinite,
    stop_requested,
    stop_unless_gradients_flow,
)
from vlmtune.train.vision_cache import ImageKeys, fill_cache, open_cache
from vlmtune.train.window import Window


def train(cfg: Config, model_folder: ModelFolder = local_folder) -> RunResult:
    """Runs a fine-tuning job (every stage, in order) and writes its outputs to ``cfg.train.output_dir``.

    Everything is checked before the run folder changes: the model, the plan of every stage and every stage's
    data. Only then does a fresh start clear an earlier run's checkpoints (``train/output_dir.py``).

    Args:
        cfg: the validated run config.
        model_folder: resolves ``model.path`` to a local folder (the commands pass one that builds the builtin base).

    Raises:
        RunStopped: a signal asked the run to stop (a checkpoint was written) or the loss became non-finite.
        ConfigError: the plan is invalid, or a resume would mix runs with different settings.
        OutputDirBusy: another run uses ``train.output_dir``.
    """
    t, out = cfg.train, Path(cfg.train.output_dir)
    if not isinstance(t.batch_size, int):  # resolved above this layer: the planner reads the data and the host
        raise ValueError(f"train.batch_size: {t.batch_size} is resolved by vlmtune.commands.train.run_training")
    accelerator = make_accelerator(t.grad_accum, t.report_to, t.output_dir)
    set_seed(t.seed)
    stages = resolve_stages(cfg)
    with OutputLock(out, accelerator):
        with accelerator.main_process_first():  # one process builds the builtin base; the others then find it
            folder = model_folder(cfg.model, echo=echo, alone=accelerator.num_processes > 1)
        # Model and trainability: every parameter in one group; each stage makes each group frozen, LoRA or full.
        built = build_model(cfg, stages, folder, accelerator.device, echo=echo)
        resume_from = find_resume_point(out, cfg, accelerator)
        state = read_state(resume_from, accelerator.process_index) if resume_from is not None else None
        first = state.progress.stage_index if state is not None else 0  # the first stage still to run
        data = load_stage_data(stages[first:], built.processor)
        run = start_run(cfg, stages, built, state, accelerator)

        with StopSignals() as signals:
            model = built.model
            for stage, plans in zip(stages[first:], built.stage_plans[first:]):
                resuming = state if state is not None and run.progress.stage_step > 0 else None
                model = run_stage(run, model, stage, plans, data[stage.index - first], resuming, signals)
                state = None

        final = save_final(run, model)
        if accelerator.is_main_process:
            plot_loss(run.metrics.records, out / "loss.png")
            if any(k.startswith("eval/") for r in run.metrics.records for k in r):
                plot_metrics(out / "metrics.jsonl", out / "metrics.png")
            echo(
                f"wrote {final} ({adapter_size(final) / 1e6:.2f} MB of weights), {out / 'metrics.jsonl'}, {out / 'loss.png'}"
            )
            report_at_run_end(out)
    accelerator.end_training()
    stage_dirs = [out / s.name for s in stages if s.named]
    return RunResult(out, final, run.progress.global_step, run.first_eval, run.last_eval, run.last_loss, stage_dirs)


def start_run(cfg: Config, stages: list[Stage], built: BuiltModel, state: TrainerState | None, accelerator) -> Run:
    """Once everything is checked: an earlier run's checkpoints cleared (fresh start) or the resume state loaded,
    the resolved config, the metrics log, the objective and the vision cache."""
    out = Path(cfg.train.output_dir)
    check_convertible(accelerator, built.union)
    if state is None:
        clear_earlier_run(out, stages, accelerator)
    if accelerator.is_main_process:
        (out / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
    model, gmap = built.model, built.gmap
    echo(f"model: {type(model).__name__} ({gmap.arch.name}, layout {gmap.layout.name})")
    cache = open_cache(cfg, stages, model, gmap, built.union)
    packing = any(s.cfg.train.packing for s in stages)  # the registry said the family packs (build_model)
    share = gmap.arch.vision_cache and any(s.cfg.train.method in ROW_METHODS for s in stages)
    if share:  # a pair's (a group's) rows encode their sample's images once
        share_vision_rows(inner_model(model).model)
    if packing:
        echo(
            f"packing: on (samples end to end in rows, positions restarting per sample; "
            f"{model.config._attn_implementation} attention)"
        )
    progress = Progress()
    if state is not None:
        load_trainable(model, state, built.trained_params)
        progress = state.progress
        echo(
            f"resuming from {state.folder}: stage {progress.stage_index + 1}/{len(stages)}, "
            f"{progress.stage_step} steps into it, run step {progress.global_step}"
        )
    if sharding(cfg, accelerator):  # after the resume state's weights were copied in, before any optimizer exists
        shard_model(model, built.processor)
    metrics = MetricsLog(out / "metrics.jsonl", accelerator, keep=progress.metrics_lines)
    if cfg.train.report_to:
        accelerator.init_trackers("vlmtune")
    return Run(
        cfg,
        accelerator,
        out,
        built.processor,
        gmap,
        metrics,
        progress,
        SFT(cfg.train.label_only_logits),  # each stage sets its own (prepare_stage)
        built.trained_params,
        n_stages=len(stages),
        last_checkpoint=state.folder if state is not None else None,
        cache=cache,
        image_keys=ImageKeys(built.processor) if cache is not None else None,
        share_rows=share,
        method=stages[progress.stage_index - 1].cfg.train.method if progress.stage_index > 0 else "",
        initial=built.initial,
    )


def run_stage(
    run: Run,
    model,
    stage: Stage,
    plans: list[GroupPlan],
    data: StageData,
    state: TrainerState | None,
    signals: StopSignals,
):
    """Trains one stage: its trainable groups, data, optimizer and schedule; writes its folder at the end."""
    sr = prepare_stage(run, model, stage, plans, data, state)
    t, acc, progress = stage.cfg.train, run.accelerator, run.progress
    bar = tqdm(
        total=sr.total,
        initial=progress.stage_step,
        desc=stage.name,
        disable=not (t.progress_bar and acc.is_main_process),
        dynamic_ncols=True,
    )
    window = Window(names=run.objective.metric_names)
    sr.model.train()
    while progress.stage_step < sr.total:
        sr.sampler.start = progress.batch_in_epoch * t.batch_size * acc.num_processes
        sr.loader.set_epoch(progress.epoch)
        sr.train_ds.set_epoch(progress.epoch)  # augmentation draws depend on (seed, sample, epoch)
        announce_mix(run, sr)
        for batch in sr.loader:
            progress.batch_in_epoch += 1
            if not take_notes(batch, sr.train_ds, acc):
                continue  # every sample of it was left out when read (a lazily read split)
            with acc.accumulate(sr.model):
                train_step(run, sr, batch, window)
            if not acc.sync_gradients:
                continue
            progress.stage_step += 1
            progress.global_step += 1
            bar.update(1)
            after_step(run, sr, window, bar, signals)
            if progress.stage_step >= sr.total:
                break
        else:
            progress.epoch += 1
            progress.batch_in_epoch = 0
    bar.close()
    finish_stage(run, sr)
    return sr.model


def prepare_stage(
    run: Run, model, stage: Stage, plans: list[GroupPlan], data: StageData, state: TrainerState | None
) -> StageRun:
    """The stage's plan made active, its data, optimizer groups (one per component, its own rate) and schedule,
    prepared by accelerate; the state of a resumed stage restored; the eval before training."""
    cfg, t, acc, progress = stage.cfg, stage.cfg.train, run.accelerator, run.progress
    unwrapped = acc.unwrap_model(model)
    activate(unwrapped, run.gmap, plans)
    if progress.stage_step == 0:
        progress.epoch = progress.batch_in_epoch = 0
        progress.stage_start_step[stage.name] = progress.global_step
        run.metrics.log({"step": progress.global_step, "stage_start": stage.name})
    progress.stage_name = stage.name

    # Data (checked before the run started, or when read for a lazy split): samples that fit, images never cut.
    train_ds, eval_ds = data.train, data.eval
    write_data_report(run.out, acc, stage, data)
    workers = loader_workers(cfg.data.num_workers, acc.num_processes)
    method, share = t.method, run.share_rows
    repeat = (t.batch_size * t.grad_accum * acc.num_processes, t.grpo.num_iterations) if method == "grpo" else None
    loader = make_loader(
        train_ds,
        run.processor,
        t.batch_size,
        True,
        t.seed,
        workers,
        t.group_by_length,
        t.packing,
        t.packing_length,
        train_mix(train_ds, cfg.data),
        method,
        share,
        repeat if repeat and repeat[1] > 1 else None,
    )
    sampler = loader.sampler  # before accelerate wraps the loader
    eval_loader = None
    if eval_ds:
        eval_loader = make_loader(eval_ds, run.processor, t.batch_size, False, t.seed, 0, method=method, share=share)
    if run.cache is not None and vision_cache_applies(train_ds):
        train_ds.use_vision_cache(run.image_keys, run.cache)  # batches carry cached features and grids, no pixels
        fill_cache(run.cache, run.image_keys, acc, unwrapped, train_ds, t.batch_size, t.progress_bar)

    # Optimizer: one parameter group per component (its own learning rate and weight decay), new each stage.
    groups = param_groups(unwrapped, run.gmap, plans)
    optimizer = build_optimizer(groups, t.adam_betas)
    steps_per_epoch = max(1, math.ceil(len(loader) / acc.num_processes / t.grad_accum))
    total = t.max_steps or max(1, math.ceil(steps_per_epoch * t.epochs))
    warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * total)
    scheduler = build_scheduler(optimizer, t.scheduler, warmup, total)
    acc.free_memory()  # a stage changes what trains: wrap the model afresh (DDP registers trainable parameters once)
    model, optimizer, loader = prepare(acc, unwrapped, optimizer, loader, state)  # the optimizer's states restored
    eval_loader = acc.prepare(eval_loader) if eval_loader is not None else None
    if state is not None:
        scheduler.load_state_dict(state.scheduler)
    # The method: its objective, and what it keeps from the stage's start (the reference of DPO, KTO and GRPO).
    run.objective = make_objective(cfg, run.processor, rope_index_of(inner_model(unwrapped)) if t.packing else None)
    trained = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
    run.objective.start(unwrapped, trained, state.objective if state is not None else None)
    if getattr(run.objective, "reference", None) is not None:
        echo(f"{t.method}: {run.objective.reference.describe()}")
    sr = StageRun(
        stage,
        plans,
        model,
        loader,
        sampler,
        train_ds,
        eval_loader,
        eval_ds,
        groups,
        optimizer,
        scheduler,
        total,
        before={},
        flow_checked=not t.check_gradient_flow,
    )
    announce(run, sr)

    if eval_loader is not None and progress.global_step == 0:
        run.first_eval = run.last_eval = evaluate_stage(run, sr, show=True, gallery="before")
        echo(f"eval loss before training: {run.first_eval:.4f}")
    elif eval_loader is not None and progress.stage_step == 0 and run.method != t.method:
        evaluate_stage(run, sr, show=True)  # another method measures other things: its figures before it trains
        echo(f"stage '{stage.name}' ({t.method}) before training: the figures above")
    run.method = t.method
    sr.before = fingerprints(unwrapped, run.trained_params)
    # The random streams (dropout) continue from the checkpoint, or start from the seed at a stage's start.
    restore_rng(state.rng_file) if state is not None else set_seed(t.seed + stage.index)
    return sr


def train_step(run: Run, sr: StageRun, batch: dict, window: Window) -> None:
    """One micro-batch: the objective's loss, backward, and at the end of an accumulation window the optimizer
    step (after the first step's gradient-flow check and the gradient clipping). Non-finite values skip or stop."""
    acc, t = run.accelerator, sr.stage.cfg.train
    run.objective.step = run.progress.global_step  # GRPO seeds its sampling with it
    step = run.objective.loss(sr.model, batch, acc, packing=t.packing)
    window.add_batch(step.counts, batch_samples(batch), batch_has_vision(batch), acc.num_processes, step.signal)
    if all_finite(step.value, acc):
        acc.backward(step.loss)
        window.add_loss(step.logged.item())
        window.add_metrics(step.metrics)
    elif not window.step_bad:  # one count per optimizer step, however many micro-batches are bad
        stop_for_nonfinite(run, sr.stage, f"loss {step.value.item()}")
        window.step_bad = True
    if not acc.sync_gradients:
        return
    if not sr.flow_checked and not window.step_bad and any_process(window.step_images > 0, acc):
        stop_unless_gradients_flow(run, sr.model, sr.plans, sr.stage)  # text-only batches never reach the projector
        sr.flow_checked = True
    stage_step = run.progress.stage_step + 1
    if stage_step % t.logging_steps == 0 or stage_step == sr.total:
        window.grad_norms = group_grad_norms(acc.unwrap_model(sr.model), run.gmap)
    norm = clip_gradients(acc, sr.trainable, t.max_grad_norm) if t.max_grad_norm else None
    if not window.step_bad and norm is not None and not all_finite(norm.detach().float(), acc):
        stop_for_nonfinite(run, sr.stage, f"gradient norm {norm.item()}")
        window.step_bad = True
    if not window.step_bad:
        sr.optimizer.step()
    sr.scheduler.step()
    sr.optimizer.zero_grad(set_to_none=True)
    window.end_step()


def after_step(run: Run, sr: StageRun, window: Window, bar, signals: StopSignals) -> None:
    """After an optimizer step: log the window, evaluate, save, and stop (saving first) when a signal asked."""
    t, progress, step = sr.stage.cfg.train, run.progress, run.progress.stage_step
    if step % t.logging_steps == 0 or step == sr.total:
        record = window.record(run.accelerator)
        if record is not None:
            run.last_loss = record["loss"]
            lrs = sr.scheduler.get_last_lr()
            record = {
                "step": progress.global_step,
                "stage": sr.stage.name,
                "loss": record["loss"],
                "lr": lrs[0],
                **{k: v for k, v in record.items() if k != "loss"},
            }
            record.update({f"lr/{g['name']}": lr for g, lr in zip(sr.param_groups, lrs)})
            record.update({f"grad_norm/{group}": value for group, value in window.grad_norms.items()})
            if progress.nonfinite_skips:
                record["nonfinite_skips"] = progress.nonfinite_skips
            run.metrics.log(record)
            bar.set_postfix(loss=f"{run.last_loss:.4f}", lr=f"{lrs[0]:.2e}", sps=f"{record['samples_per_s']:.1f}")
    if sr.eval_loader is not None and t.eval_steps and step % t.eval_steps == 0 and step != sr.total:
        run.last_eval = evaluate_stage(run, sr)
    checkpoint = run.out / f"checkpoint-{progress.global_step}"
    if t.save_steps and step % t.save_steps == 0 and step != sr.total:
        save_resumable(run, sr.model, checkpoint, sr.optimizer, sr.scheduler)
    if stop_requested(signals, run.accelerator):
        folder = save_resumable(run, sr.model, checkpoint, sr.optimizer, sr.scheduler)
        signum = signals.signum or signal.SIGTERM
        raise RunStopped(
            f"stopped by {signal.Signals(signum).name} at stage '{sr.stage.name}' step {step}/{sr.total} "
            f"(run step {progress.global_step}); saved {folder}. Run the same command with --resume to "
            "continue from there.",
            128 + signum,
        )


def finish_stage(run: Run, sr: StageRun) -> None:
    """The stage's last eval, what it changed per group, and its folder (for a named stage)."""
    stage, progress = sr.stage, run.progress
    write_data_report(run.out, run.accelerator, stage, StageData(sr.train_ds, sr.eval_ds), final=True)
    if sr.eval_loader is not None:
        run.last_eval = evaluate_stage(run, sr, show=True, gallery="after")
        echo(
            f"eval loss after stage '{stage.name}': {run.last_eval:.4f}"
            + (f" (before training: {run.first_eval:.4f})" if run.first_eval is not None else "")
        )
        check_stage_generation(run, sr)
    report_changes(run, sr, sr.plans, fingerprints(run.accelerator.unwrap_model(sr.model), run.trained_params))
    progress.stage_index, progress.stage_step = stage.index + 1, 0
    progress.epoch = progress.batch_in_epoch = 0
    if stage.named:
        save_resumable(run, sr.model, run.out / stage.name)
