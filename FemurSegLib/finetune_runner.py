"""Fine-tuning in a child process, for GUIs that must stay live (desktop Slicer, the browser app).

The child is ``python -m FemurSegLib finetune DATASET --progress-json …`` (the command line's own path, so every
front end fine-tunes the same way): it prints one JSON object per line (``{"progress": f, "stage": s}``,
``{"message": m}``, and at the end ``{"done": name, "model": folder, "summary": text}``) and refusals as
``femurseg: error: …`` on stderr. It runs in its own process group (session). :meth:`FinetuneProcess.cancel`
interrupts it (SIGINT: Python unwinds, an install in progress removes its staging copy) and kills the whole group
if it has not ended ``CANCEL_GRACE_S`` later; either way no model is installed, and starting the same fine-tuning
again resumes from its last epoch. The caller polls :meth:`poll` from its event loop (a Qt timer, a trame async
task) or blocks in :meth:`wait_for_completion` (scripts and tests).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from .childprocess import CommandJob, CommandProcess, apply_progress
from .finetune import ITERATIONS_PER_EPOCH, plan_finetune

CANCEL_GRACE_S = 15.0  # one training iteration on a 2-core CPU takes a few seconds


@dataclass
class FinetuneState:
    progress: float = 0.0
    stage: str = "starting"
    messages: list[str] = field(default_factory=list)
    model_name: str | None = None  # the installed model, once done
    model_folder: str | None = None
    summary: str = ""  # its before/after figures
    error: str | None = None
    finished: bool = False
    cancelled: bool = False

    def describe(self) -> str:
        """One line for a GUI: what runs now, or how it ended (the same words in Slicer and the browser)."""
        if not self.finished:
            return self.stage + (f": {self.messages[-1]}" if self.messages else "")
        if self.error:
            return f"Fine-tuning failed: {self.error}"
        if self.cancelled:
            return "Fine-tuning cancelled; no model was installed. Start it again to resume where it stopped."
        return f"New model {self.model_name} installed and selected: {self.summary}."


class FinetuneProcess(CommandJob):
    """One background fine-tuning; read ``state`` at any time (after :meth:`poll`). The request is checked here
    first (:func:`finetune.plan_finetune`, FemurSegError at once: no child starts for a refused request);
    ``job`` says what the child will do."""

    what = "Fine-tuning"

    def __init__(self, dataset_dir: str | os.PathLike, base: str | None = None, name: str | None = None,
                 minutes: float | None = None, epochs: int | None = None,
                 iterations: int = ITERATIONS_PER_EPOCH, device: str = "auto", python: str | None = None) -> None:
        self.job = plan_finetune(dataset_dir, base=base, name=name, epochs=epochs, minutes=minutes,
                                 iterations=iterations)
        arguments = ["finetune", str(dataset_dir), "--device", device, "--progress-json", "--name", self.job.name,
                     "--iterations", str(iterations)]
        for option, value in (("--from", base), ("--minutes", minutes), ("--epochs", epochs)):
            if value is not None:
                arguments += [option, str(value)]
        self.state = FinetuneState()
        self._lock = threading.Lock()
        self._child = CommandProcess(arguments, self._on_event, python, CANCEL_GRACE_S)

    def _on_event(self, event: dict) -> None:
        with self._lock:
            apply_progress(self.state, event)
            if "done" in event:
                self.state.model_name = str(event["done"])
                self.state.model_folder = str(event.get("model", ""))
                self.state.summary = str(event.get("summary", ""))

    def poll(self) -> FinetuneState:
        """Update and return the state without blocking (and kill a cancelled child that outstayed its grace)."""
        code = self._child.exit_code()
        if code is not None and not self.state.finished:
            with self._lock:
                self.state.finished = True
                if code == 0 and self.state.model_name is not None:
                    self.state.cancelled = False  # it had finished before the cancel reached it
                elif not self.state.cancelled:
                    self.state.error = self._child.error("Fine-tuning failed")
        return self.state
