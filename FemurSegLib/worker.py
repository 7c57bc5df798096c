"""The warm worker's child side: ``python -m FemurSegLib worker`` loads the model once and then segments one CT
per request, so a GUI's second Segment costs the inference, not the 10-20 s of imports and model loading.

Protocol, one JSON object per line. Requests on stdin: ``{"id": n, "ct": path, "out": path}``. Events on stdout:
``{"progress": f, "stage": s}`` and ``{"message": m}`` (with the request's ``id`` once a request runs; without
while the model loads), then per request ``{"id": n, "done": path, "femurs": [...], "warnings": [...]}`` (each femur: side, label value, volume in ml) or
``{"id": n, "error": m}``. The label is
written atomically. A request is validated as the command line validates its arguments (``id`` a number or text,
``ct`` and ``out`` text, ``out`` a volume file that is not the CT: iopolicy's checks) before any work. A problem
with one request (a malformed one, an unreadable CT) is answered and the worker goes on; anything unexpected is
answered and ends the worker, since its state is then unknown. End of stdin ends it; the GUI
side (:class:`FemurSegLib.runner.SegmentationWorker`) cancels by killing its process group.

Libraries that print would corrupt the protocol, so file descriptor 1 is pointed at stderr and the events go to
a private copy of the original stdout.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TextIO

from .errors import FemurSegError


def _event_stream() -> TextIO:
    """A private handle on the real stdout; fd 1 (print, C libraries) goes to stderr from now on."""
    sys.stdout.flush()
    private = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return private


def parse_request(line: str) -> tuple[int | str, str, str]:
    """(id, ct, out) of one request line, or FemurSegError saying what is wrong with it."""
    try:
        request = json.loads(line)
    except ValueError:
        request = None
    if not isinstance(request, dict):
        raise FemurSegError(f"Malformed worker request (not a JSON object): {line.strip()[:200]}")
    identifier = request.get("id")
    if isinstance(identifier, bool) or not isinstance(identifier, (int, str)):
        raise FemurSegError(f"Malformed worker request: 'id' must be a number or text, not {identifier!r:.60}.")
    for key in ("ct", "out"):
        if not isinstance(request.get(key), str) or not request[key]:
            raise FemurSegError(f"Malformed worker request {identifier!r:.60}: '{key}' must be a file path as text, "
                                f"not {request.get(key)!r:.60}.")
    return identifier, request["ct"], request["out"]


def serve(model: str | None, device: str, fast: bool, requests: TextIO = sys.stdin) -> None:
    from .imageio import check_output_path, read_ct, write_image
    from .inference import InferenceOptions, Segmenter
    from .models import resolve_model

    events = _event_stream()
    current: dict = {}

    def emit(event: dict) -> None:
        events.write(json.dumps({**current, **event}) + "\n")

    emit({"progress": 0.0, "stage": "loading model"})
    segmenter = Segmenter(resolve_model(model).root, InferenceOptions(device=device, fast=fast),
                          notify=lambda message: emit({"message": message}))
    for line in requests:
        try:
            identifier, ct_path, out_path = parse_request(line)
        except FemurSegError as error:
            emit({"error": str(error)})
            continue
        current = {"id": identifier}
        try:
            check_output_path(out_path, (ct_path,), what="Worker output")
            result = segmenter.run(read_ct(ct_path), progress=lambda fraction, stage: emit(
                {"progress": round(fraction, 4), "stage": stage}))
            write_image(result.label, out_path)
            femurs = [{"side": f.side, "value": f.value, "volume_ml": round(f.volume_ml, 1)} for f in result.femurs]
            emit({"done": str(out_path), "femurs": femurs, "warnings": list(result.warnings)})
        except FemurSegError as error:
            emit({"error": str(error)})
        except Exception as error:
            emit({"error": f"Segmentation failed: {type(error).__name__}: {error}"})
            raise
        current = {}
