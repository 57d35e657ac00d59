"""Stop signals: SIGTERM (preemption), SIGUSR1 (Slurm's warning before the time limit), and Ctrl-C
(SIGINT) and a closed terminal (SIGHUP) in a process that owns them (a run started alone; our
launcher forwards them to its workers as SIGTERM; nohup's ignored SIGHUP stays ignored): the same
stop, a checkpoint and exit 75, never a KeyboardInterrupt or a death without a checkpoint.

From the first moment of a worker's life a stop signal is recorded, never fatal: our launcher
starts workers with these signals blocked (pending), and the worker unblocks them only once its
handler is in place, so no signal is lost or kills a worker that is still importing libraries.
The run acts on the record at points every rank reaches together (after set-up, after each
optimizer step): a checkpoint if there is anything to save, then exit 75 (requeue and resume).
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("dist_embed")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# stops too where the process has them as Python starts it (not ignored, no handler of a host's)
TERMINAL_SIGNALS = {signal.SIGINT: signal.default_int_handler, signal.SIGHUP: signal.SIG_DFL}


class Preempted(Exception):
    """A stop signal arrived; ``checkpoint`` is what was saved (None: stopped before the first
    step, nothing to save: a rerun with ``--resume latest`` starts the run afresh)."""

    def __init__(self, signum: int, checkpoint=None):
        name = signal.Signals(signum).name
        what = f"after saving {checkpoint}" if checkpoint is not None else "before the first step (nothing to save)"
        super().__init__(f"stopped by {name} {what}")
        self.signum, self.checkpoint = signum, checkpoint


class StopSignals:
    """The process's record of stop signals (one instance: ``STOPS``)."""

    def __init__(self):
        self.signum: int | None = None
        self.installed = False
        self._previous: dict = {}

    def install(self) -> bool:
        """Record stop signals from now on (main thread only; Ray runs workers in another thread
        and handles signals itself). Idempotent. Returns whether the handlers are in place."""
        if self.installed:
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        # Ctrl-C and SIGHUP only where they have their default: a launcher's worker starts with
        # SIGINT ignored, nohup ignores SIGHUP
        owned = tuple(s for s, default in TERMINAL_SIGNALS.items() if signal.getsignal(s) == default)
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS + owned}
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # pending ones arrive now
        self.installed = True
        return True

    def uninstall(self) -> None:
        """Put back the handlers ``install`` replaced (a run inside a longer-lived process)."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self.installed, self._previous, self.signum = False, {}, None

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            log.warning("%s received: stopping at the next safe point (after this step, with a checkpoint)", name)
        else:
            log.warning("%s received again: already stopping; checkpoints are written atomically", name)

    def requested(self, state) -> bool:
        """Whether any rank was signalled (all ranks call it at the same points: one tiny all-reduce)."""
        if not state.enabled:
            return self.signum is not None
        from ..distributed import all_reduce_sum

        (n,) = all_reduce_sum([1.0 if self.signum is not None else 0.0], state)
        if n > 0 and self.signum is None:
            self.signum = signal.SIGTERM  # another rank was signalled
        return n > 0


STOPS = StopSignals()
