"""Fault tolerance of the loop (docs/architecture.md#faults): a stop signal ends the run at a checkpoint, a
scorer that raises is retried and then its step skipped, and a resume refuses a recipe that changed.

- SIGTERM / SIGINT (a preemption, a Ctrl-C, a cluster's time limit): the iteration in flight finishes, a
  checkpoint is written, and the run returns with exit status 0; re-running the command resumes it, and the
  resumed run ends where an uninterrupted one would have. A second signal stops at once.
- A scorer that raises (a flaky reward server, a dropped connection): its scoring call is repeated ``reward.retries``
  times with backoff; when it still fails, the iteration is skipped (no update; its seeds are used up, so the
  rest of the run is the same whether or not a step was skipped), counted in ``skipped_steps``, and more than
  ``reward.max_consecutive_skips`` skips in a row stop the run with the scorer's error. A scorer that has never
  worked in this run raises at once: that is a broken recipe, not a flaky server.
- A resume whose recipe differs from the checkpoint's (other than :data:`RESUMABLE_CHANGES`) is refused with
  the differences, unless ``--resume-changed``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

# Fields a resumed run may change without changing what it computes: its length, its logs and checkpoints.
RESUMABLE_CHANGES = frozenset({"run.iterations", "run.output_dir", "run.progress", "run.checkpoint_every",
                               "run.keep_last", "run.grid_every", "run.tensorboard", "run.wandb", "run.report_to",
                               "run.wandb_project", "run.wandb_name", "run.wandb_resume_id"})


class StepSkipped(RuntimeError):
    """This iteration's experience could not be made (its scorer kept failing); the loop skips the step."""


class StopRequest:
    """Set by SIGTERM / SIGINT while :func:`stop_on_signals` is active; the loop checks :attr:`requested`."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[StopRequest]:
    """Inside the block the first of ``signals`` only sets the returned request; a second one raises
    KeyboardInterrupt (stop now). Outside the main thread (where handlers cannot be installed) it is a no-op."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: Any) -> None:
        if request.requested:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        request.signal = signum

    previous = {s: signal.signal(s, handle) for s in signals}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class ScorerRetry:
    """Calls a scoring function with retries, and decides between skipping the step and stopping the run.

    Args:
        retries: further calls after a failure (``reward.retries``).
        backoff_s: wait before the first retry, doubled per retry (``reward.retry_backoff_s``).
        max_consecutive_skips: skipped steps in a row that are still tolerated (``reward.max_consecutive_skips``).
        passthrough: exception types that are never retried (they mean the recipe is wrong, e.g. all-NaN rewards).
    """

    def __init__(self, retries: int, backoff_s: float, max_consecutive_skips: int,
                 passthrough: tuple[type[BaseException], ...] = ()) -> None:
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_consecutive_skips = max_consecutive_skips
        self.passthrough = passthrough
        self.succeeded = False  # has any call worked in this run?
        self.consecutive = 0
        self.retried = 0  # retries of the last call

    def __call__(self, fn: Callable[[], T], *, restore: Callable[[], None] = lambda: None) -> T:
        """``fn()``; on failure ``restore()`` then retry. Raises :class:`StepSkipped` when the step should be
        skipped, or the scorer's own error when the run should stop."""
        self.retried = 0
        for attempt in range(self.retries + 1):
            try:
                result = fn()
            except self.passthrough:
                raise
            except Exception as err:
                restore()  # a partly scored batch must not leave running statistics updated twice
                if not self.succeeded:
                    raise  # nothing has ever scored in this run: a broken scorer or recipe, reported as it is
                if attempt < self.retries:
                    self.retried += 1
                    time.sleep(self.backoff_s * 2 ** attempt)
                    continue
                self.consecutive += 1
                if self.consecutive > self.max_consecutive_skips:
                    raise RuntimeError(f"scoring failed on {self.consecutive} steps in a row (more than "
                                       f"reward.max_consecutive_skips = {self.max_consecutive_skips}); last error: "
                                       f"{type(err).__name__}: {err}") from err
                raise StepSkipped(f"{type(err).__name__}: {err}") from err
            self.succeeded = True
            self.consecutive = 0
            return result
        raise AssertionError("unreachable")

    def state_dict(self) -> dict[str, Any]:
        return {"succeeded": self.succeeded, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.succeeded = bool(state.get("succeeded", False))
        self.consecutive = int(state.get("consecutive", 0))


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved → current`` for every dotted config key that differs, except :data:`RESUMABLE_CHANGES`."""
    old, new = _flatten(saved), _flatten(current)
    lines = []
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_CHANGES or old.get(key, "<unset>") == new.get(key, "<unset>"):
            continue
        lines.append(f"{key}: {old.get(key, '<unset>')!r} → {new.get(key, '<unset>')!r}")
    return lines


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(data) if isinstance(data, tuple) else data}
