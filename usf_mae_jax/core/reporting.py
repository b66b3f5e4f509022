"""What a person watches during training: log lines, TensorBoard scalars and images, and a progress bar.

Only process 0 writes (docs/design.md, "Multi-host"); the other processes get no-op writers. TensorBoard
events are flushed at every write, so a run killed with -9 keeps its history up to the last log step, and a
resumed run continues the same curves. Log lines go through tqdm while the bar is shown
(`Progress.logging()`), so the bar and the log never interleave on one terminal line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

import jax
import numpy as np
from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2, summary_pb2
from tqdm import tqdm

log = logging.getLogger(__name__)


class MetricWriter:
    """TensorBoard scalars/images plus one log line per write, from process 0 only.

    Events are written and flushed synchronously (tensorboardX's `EventsWriter`, not its queued
    `SummaryWriter`, whose background thread can hold the last events when the process is killed).
    """

    def __init__(self, workdir: str, enabled: bool | None = None, resume_step: int | None = None):
        """`resume_step`: the step a resumed run restarts from; TensorBoard then drops the events that a killed
        run logged after that step (a purge `SessionLog.START`), so every curve stays one continuous line."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._events = None
        if self.enabled:
            folder = os.path.join(workdir, "tensorboard")
            os.makedirs(folder, exist_ok=True)
            self._events = EventsWriter(os.path.join(folder, "events"), f".{os.getpid()}.{id(self)}")
            if resume_step:
                self._write(event_pb2.Event(step=resume_step + 1, session_log=event_pb2.SessionLog(
                    status=event_pb2.SessionLog.START)))

    def _write(self, event: event_pb2.Event) -> None:
        event.wall_time = time.time()
        self._events.write_event(event)
        self._events.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        merged = summary_pb2.Summary()
        for name, value in values.items():
            merged.value.extend(tb_summary.scalar(name, float(value)).value)
        self._write(event_pb2.Event(step=step, summary=merged))
        log.info("step %d: %s", step, ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.enabled:
            self._write(event_pb2.Event(step=step, summary=tb_summary.image(name, image, dataformats="HWC")))

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def _fmt(value: float) -> str:
    value = float(value)
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class Progress:
    """A tqdm bar (step, ETA, loss) on process 0, and an images/s meter between log points."""

    def __init__(self, start_step: int, total_steps: int, enabled: bool | None = None):
        enabled = jax.process_index() == 0 if enabled is None else enabled
        self._bar = tqdm(total=total_steps, initial=start_step, disable=not enabled, unit="step",
                         dynamic_ncols=True, mininterval=1.0)
        self._mark_time, self._mark_step = time.perf_counter(), start_step

    def update(self, step: int, loss: float | None = None) -> None:
        self._bar.update(step - self._bar.n)
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    @contextlib.contextmanager
    def logging(self):
        """Context in which log records are printed through the bar (tqdm.write) instead of across it.

        The root logger's handlers (absl's or basicConfig's) are swapped for one that writes with tqdm, so a
        record is printed once, on its own line, and the bar is redrawn below it.
        """
        if self._bar.disable:
            yield
            return
        root = logging.getLogger()
        saved = root.handlers[:]
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(min((h.level for h in saved), default=logging.NOTSET))
        root.handlers = [handler]
        try:
            yield
        finally:
            root.handlers = saved

    def reset_meter(self, step: int) -> None:
        """Starts the images/s window at `step` now (after compilation, so it never counts it)."""
        self._mark_time, self._mark_step = time.perf_counter(), step

    def images_per_second(self, step: int, batch_size: int) -> float:
        now = time.perf_counter()
        rate = (step - self._mark_step) * batch_size / max(now - self._mark_time, 1e-9)
        self._mark_time, self._mark_step = now, step
        return rate

    def close(self) -> None:
        self._bar.close()
