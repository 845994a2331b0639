"""A readable console for local pipeline runs: one line per step on screen, everything else in a log file.

kfp's local runner prints every executor's JSON, each step's streamed output and its own log lines to
``sys.stdout``/the root logger. :class:`StepConsole` takes both over for the duration of a run: every byte goes to
the log file unchanged, and the runner's own markers ("Executing task X", "Task X finished with status ...",
"Task X cache hit") become one line per step on the real terminal: name, status, seconds, cache hit. When a step
fails, its last lines are shown with the log file's path.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '?(?P<task>[\w.-]+)'?")
_END = re.compile(r"Task '?(?P<task>[\w.-]+)'? finished with status (?P<status>\w+)")
_CACHED = re.compile(r"Task '?(?P<task>[\w.-]+)'? cache hit")
#: lines of a failed step shown on screen
TAIL_LINES = 25


@dataclass
class StepLine:
    task: str
    started: float
    status: str = "RUNNING"
    seconds: float = 0.0
    cached: bool = False


@dataclass
class _State:
    steps: dict[str, StepLine] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    current: str | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))


class _Tee(io.TextIOBase):
    """A text stream that writes to the log file and feeds complete lines to the console."""

    def __init__(self, console: StepConsole) -> None:
        self._console = console
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._console.log.write(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._console.feed(line)
        return len(text)

    def flush(self) -> None:
        self._console.log.flush()

    def isatty(self) -> bool:
        return False


class StepConsole:
    """Context manager: while active, stdout, stderr and the root logger go to ``log_path``; the terminal gets a
    line per pipeline step. ``steps`` holds what was seen (for the summary and for tests)."""

    def __init__(self, log_path: Path, screen: TextIO | None = None) -> None:
        self.log_path = Path(log_path)
        self.screen = screen if screen is not None else sys.stdout
        self._state = _State()
        self.log: TextIO

    @property
    def steps(self) -> list[StepLine]:
        return [self._state.steps[t] for t in self._state.order]

    def failure_tail(self) -> list[str]:
        """The last lines logged before the run stopped (the failing step's output when one failed)."""
        return list(self._state.tail)

    def _show(self, step: StepLine) -> None:
        mark = {"SUCCESS": "ok", "FAILURE": "FAILED"}.get(step.status, step.status.lower())
        detail = "cached" if step.cached else f"{step.seconds:6.1f} s"
        self.screen.write(f"  {mark:<7}{step.task:<42}{detail}\n")
        self.screen.flush()

    def feed(self, raw: str) -> None:
        line = _ANSI.sub("", raw).strip()
        self._state.tail.append(raw.rstrip())
        if m := _CACHED.search(line):
            task = m["task"]
            step = StepLine(task=task, started=time.time(), status="SUCCESS", cached=True)
            self._remember(step)
            self._show(step)
        elif m := _START.search(line):
            self._state.tail.clear()
            self._state.tail.append(raw.rstrip())
            self._remember(StepLine(task=m["task"], started=time.time()))
            self._state.current = m["task"]
        elif m := _END.search(line):
            step = self._state.steps.get(m["task"]) or StepLine(task=m["task"], started=time.time())
            step.status = m["status"].upper()
            step.seconds = time.time() - step.started
            self._remember(step)
            self._show(step)

    def _remember(self, step: StepLine) -> None:
        if step.task not in self._state.steps:
            self._state.order.append(step.task)
        self._state.steps[step.task] = step

    @contextlib.contextmanager
    def capture(self) -> Iterator[StepConsole]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        root = logging.getLogger()
        saved = (sys.stdout, sys.stderr, root.handlers[:])
        with open(self.log_path, "a", encoding="utf-8") as self.log:
            tee = _Tee(self)
            handler = logging.StreamHandler(tee)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
            sys.stdout = sys.stderr = tee
            root.handlers[:] = [handler]
            try:
                yield self
            finally:
                tee.write("\n")
                sys.stdout, sys.stderr, root.handlers[:] = saved[0], saved[1], saved[2]


def default_log_path(output_root: Path, name: str) -> Path:
    """``<output_root>/logs/<name>-<YYYYmmdd-HHMMSS>.log``."""
    return Path(output_root) / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
