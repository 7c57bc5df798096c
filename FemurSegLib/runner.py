"""Segmentation in a child process, for GUIs that must stay live (desktop Slicer, the browser app).

The child is ``python -m FemurSegLib segment CT OUT --progress-json``: it prints one JSON object per line
(``{"progress": f, "stage": s}``, ``{"message": m}``, ``{"done": path}``) and writes the label atomically, so
killing it at any moment leaves no output. The child runs in its own process group (session) and
:meth:`SegmentationProcess.cancel` kills the whole group. The caller polls :meth:`poll` from its event loop
(a Qt timer, a trame async task) or blocks in :meth:`wait_for_completion` (scripts and tests).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FemurSegError


@dataclass
class RunnerState:
    progress: float = 0.0
    stage: str = "starting"
    messages: list[str] = field(default_factory=list)
    output: Path | None = None
    error: str | None = None
    finished: bool = False
    cancelled: bool = False


class SegmentationProcess:
    """One background segmentation; read ``state`` at any time."""

    def __init__(self, ct_path: str | os.PathLike, output_path: str | os.PathLike, model: str | None = None,
                 device: str = "auto", fast: bool = True, python: str | None = None) -> None:
        command = [python or sys.executable, "-m", "FemurSegLib", "segment", str(ct_path), str(output_path),
                   "--device", device, "--progress-json", "--fast" if fast else "--no-fast"]
        if model:
            command += ["--model", str(model)]
        environment = dict(os.environ)
        package_root = str(Path(__file__).resolve().parent.parent)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environment.get("PYTHONPATH")]))
        self.state = RunnerState()
        self._lock = threading.Lock()
        self._stderr: list[str] = []
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
            start_new_session=True,
        )
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self._lock:
                if "progress" in event:
                    self.state.progress = float(event["progress"])
                    self.state.stage = str(event.get("stage", ""))
                if "message" in event:
                    self.state.messages.append(str(event["message"]))
                if "done" in event:
                    self.state.output = Path(event["done"])

    def _read_stderr(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            self._stderr.append(line.rstrip())

    def poll(self) -> RunnerState:
        """Update and return the state without blocking."""
        code = self._process.poll()
        if code is not None and not self.state.finished:
            for reader in self._readers:
                reader.join(timeout=5)
            with self._lock:
                self.state.finished = True
                if code != 0 and not self.state.cancelled:
                    errors = [line for line in self._stderr if line.startswith("femurseg: error:")]
                    self.state.error = (errors[-1].removeprefix("femurseg: error: ") if errors
                                        else "Segmentation failed: " + (self._stderr[-1] if self._stderr else f"exit code {code}"))
        return self.state

    def cancel(self) -> None:
        """Kill the child and everything it started; returns once they are gone."""
        self.state.cancelled = True
        if self._process.poll() is None:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._process.wait()
        self.poll()

    def wait_for_completion(self, timeout_s: float | None = None) -> RunnerState:
        """Block until the child ends; raise FemurSegError on failure or time-out (then the child is killed)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._process.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise FemurSegError(f"Segmentation took longer than {timeout_s:.0f} s and was stopped.")
            time.sleep(0.1)
        state = self.poll()
        if state.error:
            raise FemurSegError(state.error)
        return state
