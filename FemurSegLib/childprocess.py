"""What the background front ends read from a FemurSeg child process: JSON events on stdout, the error on stderr.

The Slicer panel and the browser run segmentation (runner.py) and fine-tuning (finetune_runner.py) in child
processes that print one JSON object per line on stdout (anything else there, e.g. a library's print, is skipped)
and end with ``femurseg: error: ...`` on stderr when they fail.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

ERROR_PREFIX = "femurseg: error: "


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
