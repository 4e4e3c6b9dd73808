"""Preemption: SIGTERM/SIGINT end training cleanly after the current step, on every rank."""
from __future__ import annotations

import signal
import threading

import torch

from sge import distributed


class StopFlag:
    """SIGTERM/SIGINT ask the loop to stop after the current step (a second SIGINT aborts).

    Preempted jobs get SIGTERM and a grace period: finishing one step and saving fits in it.
    """

    def __init__(self):
        self.requested = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """Whether any process was asked to stop: one tiny all-reduce, so every rank gets
        the same answer (ranks that were not signalled themselves then stop too)."""
        asked = torch.tensor([float(self.requested is not None)], dtype=torch.float64)
        if distributed.sum_tensor(asked).item() > 0:
            self.requested = self.requested or "a signal to another process"
            return True
        return False
