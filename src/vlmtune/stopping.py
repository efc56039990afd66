"""How a run ends early on purpose: a signal (preemption, Ctrl-C) or a value that is not finite."""

from __future__ import annotations

import signal
import threading

from vlmtune.distributed import any_process

NONFINITE_EXIT = 3
GRADIENT_FLOW_EXIT = 4


class RunStopped(RuntimeError):
    """The run ended early on purpose (a signal, a non-finite loss); the message says what to do next."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


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
