"""Segmentation in a warm child process, for GUIs that must stay live (desktop Slicer, the browser app).

The child is ``python -m FemurSegLib worker`` (:mod:`FemurSegLib.worker`): it loads the model once and segments
one CT per request, so only the first Segment pays for importing PyTorch and nnU-Net and loading the model. The
CT goes to it as a file in the worker's temporary folder (uncompressed: fast to write and read), the label comes
back the same way; it prints JSON progress lines and writes the label atomically, so killing it at any moment
leaves no output. It
runs in its own process group (session): cancel kills the whole group and the next request starts a fresh child;
a request with another model, device or mode also starts a fresh one. The caller polls
:meth:`SegmentationJob.poll` from its event loop (a Qt timer, a trame async task) or blocks in
:meth:`SegmentationJob.wait_for_completion` (scripts and tests).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from .childprocess import apply_progress, child_error, json_events
from .errors import FemurSegError
from .imageio import read_image, write_image
from .inference import Femur

STDERR_LINES_KEPT = 200


@dataclass
class RunnerState:
    progress: float = 0.0
    stage: str = "starting"
    messages: list[str] = field(default_factory=list)
    output: Path | None = None
    femurs: list[Femur] = field(default_factory=list)  # side, label value, volume per femur found
    warnings: list[str] = field(default_factory=list)  # plausibility (guard.py), "no femur found"
    error: str | None = None
    finished: bool = False
    cancelled: bool = False


class SegmentationJob:
    """One segmentation in the worker; read ``state`` at any time."""

    def __init__(self, worker: SegmentationWorker, job_id: int, ct_path: Path, output_path: Path) -> None:
        self.worker, self.id = worker, job_id
        self.ct_path, self.output_path = ct_path, output_path
        self.state = RunnerState()
        self._answered = threading.Event()  # "done" or "error" arrived, or the worker ended

    def _apply(self, event: dict) -> None:
        with self.worker._lock:
            apply_progress(self.state, event)
            if "done" in event:
                self.state.output = Path(event["done"])
                self.state.femurs = [Femur(side=str(f["side"]), value=int(f["value"]), volume_ml=float(f["volume_ml"]),
                                           warnings=()) for f in event.get("femurs", [])]
                self.state.warnings = [str(w) for w in event.get("warnings", [])]
                self._answered.set()
            if "error" in event:
                self.state.error = str(event["error"])
                self._answered.set()

    def poll(self) -> RunnerState:
        """Update and return the state without blocking."""
        if self.state.finished:
            return self.state
        ended = self.worker._process_ended()
        if self._answered.is_set() or ended:
            with self.worker._lock:
                if not self._answered.is_set() and not self.state.cancelled:
                    self.state.error = self.worker._failure()
                self.state.finished = True
            self.ct_path.unlink(missing_ok=True)
            self.worker._job_finished(self)
        return self.state

    def result(self) -> sitk.Image | None:
        """The label of a finished job (its file is removed), None if cancelled; FemurSegError if it failed."""
        state = self.poll()
        if not state.finished:
            raise FemurSegError("The segmentation is still running.")
        if state.error:
            raise FemurSegError(state.error)
        if state.cancelled or state.output is None:
            return None
        try:
            return read_image(state.output, "Segmentation result")
        finally:
            state.output.unlink(missing_ok=True)

    def cancel(self) -> None:
        """Kill the worker and everything it started; returns once they are gone. The next job starts a new one."""
        if self.state.finished:
            return
        self.state.cancelled = True
        self.worker._kill()
        self.poll()

    def wait_for_completion(self, timeout_s: float | None = None) -> RunnerState:
        """Block until the job ends; raise FemurSegError on failure or time-out (then the worker is killed)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.poll().finished:
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise FemurSegError(f"Segmentation took longer than {timeout_s:.0f} s and was stopped.")
            time.sleep(0.05)
        if self.state.error:
            raise FemurSegError(self.state.error)
        return self.state


class SegmentationWorker:
    """The GUI's handle on the warm child: one job at a time, the model kept loaded in between."""

    def __init__(self, python: str | None = None) -> None:
        self.python = python or sys.executable
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._settings: tuple | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self._job: SegmentationJob | None = None
        self._next_id = 1
        self._work_dir: Path | None = None  # the CTs and labels in transit; removed by close()

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs (its process group id too)."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def segment(self, ct: sitk.Image, model: str | None = None, device: str = "auto",
                fast: bool = True) -> SegmentationJob:
        """Start segmenting ``ct``; starts the child when none runs with these settings. Poll the returned job."""
        if self._job is not None and not self._job.poll().finished:
            raise FemurSegError("A segmentation is already running.")
        settings = (str(model) if model else None, device, fast)
        if self.pid is None or settings != self._settings:
            self._stop()
            self._start(settings)
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="femurseg-worker-"))
        job_id = self._next_id
        self._next_id += 1
        ct_path, output_path = self._work_dir / f"ct-{job_id}.nrrd", self._work_dir / f"label-{job_id}.nrrd"
        write_image(ct, ct_path, compress=False)
        job = self._job = SegmentationJob(self, job_id, ct_path, output_path)
        request = {"id": job.id, "ct": str(ct_path), "out": str(output_path)}
        try:
            assert self._process is not None and self._process.stdin is not None
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child died: the job's poll reports why from its stderr
        return job

    def close(self) -> None:
        """End the child (cancelling a running job) and remove the temporary files."""
        self._stop()
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None

    def _stop(self) -> None:
        """End the child: cleanly when idle (end of its input), else by killing its process group."""
        process = self._process
        if process is None:
            return
        if self._job is not None and not self._job.state.finished:
            self._job.cancel()
        elif process.poll() is None:
            try:
                assert process.stdin is not None
                process.stdin.close()
                process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self._kill()
        self._process = None

    def _start(self, settings: tuple) -> None:
        model, device, fast = settings
        command = [self.python, "-m", "FemurSegLib", "worker", "--device", device,
                   "--fast" if fast else "--no-fast"] + (["--model", model] if model else [])
        environment = dict(os.environ)
        package_root = str(Path(__file__).resolve().parent.parent)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environment.get("PYTHONPATH")]))
        self._stderr.clear()
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=environment, start_new_session=True)
        self._process, self._settings = process, settings
        readers = [threading.Thread(target=self._read_events, args=(process,), daemon=True),
                   threading.Thread(target=self._read_stderr, args=(process,), daemon=True)]
        for reader in readers:
            reader.start()
        self._readers = readers

    def _read_events(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for event in json_events(process.stdout):
            job = self._job
            if job is not None and process is self._process and event.get("id", job.id) == job.id:
                job._apply(event)

    def _read_stderr(self, process: subprocess.Popen) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self._stderr.append(line.rstrip())

    def _process_ended(self) -> bool:
        """True once the child has exited and everything it printed has been read."""
        if self._process is None:
            return True
        if self._process.poll() is None:
            return False
        for reader in self._readers:
            reader.join(timeout=5)
        return True

    def _failure(self) -> str:
        code = self._process.returncode if self._process is not None else None
        return child_error(self._stderr, "Segmentation failed" if self._stderr
                           else f"Segmentation failed: the worker ended (exit code {code})")

    def _kill(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()

    def _job_finished(self, job: SegmentationJob) -> None:
        if self._job is job:
            self._job = None
