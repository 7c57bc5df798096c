"""What the background front ends read from a FemurSeg child process: JSON events on stdout, the error on stderr.

The Slicer panel and the browser run segmentation (runner.py), fine-tuning (finetune_runner.py) and FE models
(fe_runner.py) in child processes that print one JSON object per line on stdout (anything else there, e.g. a
library's print, is skipped) and end with ``femurseg: error: ...`` on stderr when they fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import FemurSegError

ERROR_PREFIX = "femurseg: error: "
STDERR_LINES_KEPT = 200


def json_events(lines: Iterable[str]) -> Iterator[dict]:
    """The lines that are JSON objects, parsed; the others skipped."""
    for line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            yield event


def apply_progress(state: Any, event: dict) -> None:
    """The events both children send: ``progress`` (with its ``stage``) and ``message``, into ``state``'s
    ``progress``, ``stage`` and ``messages``."""
    if "progress" in event:
        state.progress = float(event["progress"])
        state.stage = str(event.get("stage", ""))
    if "message" in event:
        state.messages.append(str(event["message"]))


def child_error(stderr_lines: list[str], fallback: str) -> str:
    """The child's last ``femurseg: error:`` message, else ``fallback`` and its last stderr line (why it ended)."""
    errors = [line for line in stderr_lines if line.startswith(ERROR_PREFIX)]
    if errors:
        return errors[-1].removeprefix(ERROR_PREFIX)
    return f"{fallback}: {stderr_lines[-1]}" if stderr_lines else fallback


class CommandProcess:
    """``python -m FemurSegLib ARGS`` in its own process group (session), the command line's own path, for the
    background jobs that run one command to its end (fine-tuning, FE models; segmentation keeps a warm worker
    instead). Each JSON event on stdout goes to ``on_event`` from a reader thread; the last stderr lines are
    kept for :meth:`error`. :meth:`cancel` sends SIGINT (Python unwinds, atomic writes leave nothing) and
    :meth:`exit_code` kills the whole group once ``grace_s`` has passed."""

    def __init__(self, args: list[str], on_event: Callable[[dict], None], python: str | None = None,
                 grace_s: float = 15.0) -> None:
        environment = dict(os.environ)
        package_root = str(Path(__file__).resolve().parent.parent)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environment.get("PYTHONPATH")]))
        self.grace_s = grace_s
        self.stderr: list[str] = []
        self._kill_at: float | None = None
        self._ended = False
        self._process = subprocess.Popen([python or sys.executable, "-m", "FemurSegLib", *args],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                                         start_new_session=True)
        self._readers = [threading.Thread(target=self._read_stdout, args=(on_event,), daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        """The child's process id (its process group id too)."""
        return self._process.pid

    def _read_stdout(self, on_event: Callable[[dict], None]) -> None:
        assert self._process.stdout is not None
        for event in json_events(self._process.stdout):
            on_event(event)

    def _read_stderr(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            self.stderr.append(line.rstrip())
            del self.stderr[:-STDERR_LINES_KEPT]  # library warnings can be many; the last lines say why it ended

    def _signal(self, number: int) -> None:
        try:
            os.killpg(self._process.pid, number)
        except ProcessLookupError:
            pass

    def exit_code(self) -> int | None:
        """None while the child runs; once it has ended, its exit code, with everything it printed read and
        anything it left in its group killed. Kills a cancelled child that outstayed its grace."""
        code = self._process.poll()
        if code is None and self._kill_at is not None and time.monotonic() > self._kill_at:
            self._signal(signal.SIGKILL)
            code = self._process.wait()
        if code is not None and not self._ended:
            self._signal(signal.SIGKILL)
            for reader in self._readers:
                reader.join(timeout=5)
            self._ended = True
        return code

    def cancel(self) -> bool:
        """Interrupt the child now and return at once (exit_code finishes it off); False if it had ended."""
        if self._process.poll() is not None or self._kill_at is not None:
            return False
        self._kill_at = time.monotonic() + self.grace_s
        self._signal(signal.SIGINT)
        return True

    def error(self, what: str) -> str:
        """Why the child failed, for ``what`` ("Fine-tuning failed")."""
        return child_error(self.stderr, what if self.stderr else f"{what}: exit code {self._process.returncode}")


class CommandJob:
    """Cancel and a blocking wait for the background jobs built on a CommandProcess (fine-tuning, FE models).
    A subclass sets ``_child`` and ``state`` (with ``finished``, ``cancelled`` and ``error``), ``poll`` and ``what``
    (how its time-out message names it)."""

    what = "The job"
    _child: CommandProcess
    state: Any

    def poll(self) -> Any:
        raise NotImplementedError

    def cancel(self) -> None:
        """Interrupt the child now; returns at once (poll or wait_for_completion finish it off)."""
        if self._child.cancel():
            self.state.cancelled = True

    def wait_for_completion(self, timeout_s: float | None = None) -> Any:
        """Block until the child ends; raise FemurSegError on failure or time-out (then the child is stopped)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.poll().finished:
            if deadline is not None and time.monotonic() > deadline and not self.state.cancelled:
                self.cancel()
                self.wait_for_completion()
                raise FemurSegError(f"{self.what} took longer than {timeout_s:.0f} s and was stopped.")
            time.sleep(0.1)
        if self.state.error:
            raise FemurSegError(self.state.error)
        return self.state
