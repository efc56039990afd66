"""One sweep trial as a normal training run, watched while it trains: each eval the run logs to its
``metrics.jsonl`` is reported to Optuna, and a trial the pruner gives up on is stopped the way a run is stopped
on purpose (``train/stopping.py``: a SIGTERM asks the run to save and stop at its next step).

The run trains in the main thread; a watcher thread reads the metrics file as it grows. Signals only reach the
main thread's handlers, so the sweep keeps its own handler (``SweepSignals``) for the moments the run has none
installed: the watcher's signal then does nothing, and a user's Ctrl-C ends the sweep after the trial.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path


def eval_records(path: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of every eval the run logged after it started training (the eval before training, at step
    0, is the same for every trial and says nothing about its settings)."""
    return [
        (int(r["step"]), float(r[metric]))
        for r in _records(path)
        if metric in r and r.get("step", 0) > 0 and isinstance(r[metric], (int, float))
    ]


def _records(path: Path) -> list[dict]:
    """Every complete record of a run's ``metrics.jsonl`` (none when it does not exist yet)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            continue
    return out


def steps_trained(path: Path) -> int:
    """The last optimizer step the run logged (training records carry the loss)."""
    steps = [step for step, _ in eval_records(path, "loss")]
    return max(steps, default=0)


def eval_names(path: Path) -> list[str]:
    """The eval metrics a run logged (for naming what ``--metric`` may be)."""
    return sorted({k for r in _records(path) for k in r if k == "eval_loss" or k.startswith("eval/")})


class SweepSignals:
    """The sweep's handler of SIGTERM and SIGINT while no run has its own: a signal the watcher sent is ignored,
    a user's first one is remembered (the sweep stops after the trial), a second acts as usual."""

    def __init__(self):
        self.signum: int | None = None
        self.expected = 0  # signals sent by a watcher, not yet seen here
        self._old: dict = {}

    def __enter__(self) -> SweepSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.expected:
            self.expected -= 1
            return
        if self.signum is not None:
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    @property
    def active(self) -> bool:
        return bool(self._old)


class Watcher(threading.Thread):
    """Reports a running trial's evals to Optuna; asks the run to stop once the pruner says so."""

    def __init__(self, trial, metrics: Path, metric: str, signals: SweepSignals, interval: float = 0.05):
        super().__init__(daemon=True)
        self.trial, self.metrics, self.metric, self.signals = trial, metrics, metric, signals
        self.interval = interval
        self.reported: set[int] = set()
        self.pruned_at: int | None = None  # the step whose eval made the pruner stop the trial
        self.training = False  # the run has started its stage loop (its own signal handlers are installed)
        self._done = threading.Event()
        self._read = 0  # bytes of the metrics file read so far

    def _new_records(self) -> list[dict]:
        """The records appended since the last call (from the start again if the file was rewritten, as a
        resumed run rewrites it up to its checkpoint)."""
        try:
            size = self.metrics.stat().st_size
            if size < self._read:
                self._read = 0
            with self.metrics.open("rb") as f:
                f.seek(self._read)
                chunk = f.read(size - self._read)
        except FileNotFoundError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits for the next call
        self._read += len(complete)
        records = []
        for line in complete.decode("utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def report(self) -> bool:
        """Reports the evals not reported yet; True when the trial should stop."""
        for record in self._new_records():
            self.training = self.training or "stage_start" in record
            step, value = record.get("step", 0), record.get(self.metric)
            if step <= 0 or not isinstance(value, (int, float)) or step in self.reported:
                continue
            self.reported.add(step)
            self.trial.report(float(value), step)
            if self.pruned_at is None and self.trial.should_prune():
                self.pruned_at = step
                return True
        return False

    def _send(self, signum: int) -> None:
        """A signal for the run's own handler (it saves and stops); the sweep's handler ignores it if the run
        has none installed at that moment."""
        if self.signals.active:  # signals need the main thread's handlers (the CLI's case)
            self.signals.expected += 1
            signal.pthread_kill(threading.main_thread().ident, signum)

    def run(self) -> None:
        forwarded = False
        while not self._done.wait(self.interval):
            if self.report():
                self._send(signal.SIGTERM)
                return
            if self.signals.signum is not None and not forwarded and self.training:
                # Ctrl-C while the trial was loading reached the sweep's handler: once the run trains, it gets
                # the signal too, and stops at its next step with a checkpoint.
                forwarded = True
                self._send(self.signals.signum)

    def finish(self) -> None:
        """Stops watching and reports what the run logged last (its final eval)."""
        self._done.set()
        if self.is_alive():
            self.join()
        if self.pruned_at is None:
            self.report()
