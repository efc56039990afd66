"""How a run ends early on purpose: a signal (preemption, Ctrl-C) or a value that is not finite."""

from __future__ import annotations

import signal
import threading

from vlmtune.checks import check_gradients
from vlmtune.config.stages import Stage
from vlmtune.model.tuning import GroupPlan
from vlmtune.tracking import echo
from vlmtune.train.distributed import any_process
from vlmtune.train.run import Run

NONFINITE_EXIT = 3
GRADIENT_FLOW_EXIT = 4
SAVE_FAILED_EXIT = 6


class RunStopped(RuntimeError):
    """The run ended early on purpose (a signal, a non-finite loss); the message says what to do next."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class SaveFailed(RunStopped):
    """A checkpoint could not be written (disk full, permissions): nothing half-written is left behind."""

    def __init__(self, message: str):
        super().__init__(message, SAVE_FAILED_EXIT)


class StopSignals:
    """SIGTERM / SIGINT (preemption, Ctrl-C) become a request to save and stop at the next step; a second
    signal acts as usual (the atomic checkpoint write keeps the previous checkpoint safe)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def stop_requested(signals: StopSignals, accelerator) -> bool:
    return any_process(signals.signum is not None, accelerator)


def stop_for_nonfinite(run: Run, stage: Stage, what: str) -> None:
    """Stops the run (default) or counts a skipped step; never writes over the last good checkpoint."""
    t, progress = run.cfg.train, run.progress
    where = f"stage '{stage.name}', step {progress.stage_step + 1} (run step {progress.global_step + 1})"
    last = str(run.last_checkpoint) if run.last_checkpoint else "none (no checkpoint was written yet)"
    if t.on_nonfinite == "skip" and progress.nonfinite_skips < t.max_nonfinite_skips:
        progress.nonfinite_skips += 1
        echo(
            f"warning: non-finite {what} at {where}; step skipped ({progress.nonfinite_skips} of at most "
            f"{t.max_nonfinite_skips}, train.max_nonfinite_skips)"
        )
        return
    why = (
        ""
        if t.on_nonfinite == "stop"
        else f" after {progress.nonfinite_skips} skipped steps (train.max_nonfinite_skips)"
    )
    raise RunStopped(
        f"non-finite {what} at {where}{why}. Stopped; nothing was saved after the last good checkpoint: "
        f"{last}\n  Lower the learning rate or check the data, then resume with --resume, or set "
        "train.on_nonfinite: skip",
        NONFINITE_EXIT,
    )


def stop_unless_gradients_flow(run: Run, model, plans: list[GroupPlan], stage: Stage) -> None:
    """The first step's gradients reach every trained group and no frozen one, or the run stops naming it."""
    result = check_gradients(run.accelerator.unwrap_model(model), run.gmap, plans)
    if not result.ok:
        raise RunStopped(
            f"stage '{stage.name}', first step: {result}\n  (`vlmtune doctor CONFIG` runs the same check "
            "without training; train.check_gradient_flow: false skips it)",
            GRADIENT_FLOW_EXIT,
        )
    echo(str(result))
