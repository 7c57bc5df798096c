"""``femurseg web``: serve the FemurSeg page on loopback until interrupted.

Settings the CLI does not expose come from the environment, for deployments and tests:
``FEMURSEG_WEB_OPEN_ROOTS`` (extra folders, os.pathsep-separated, whose files the page may open by path) and
``FEMURSEG_WEB_MAX_UPLOAD_MB`` (default 512).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from trame.app import get_server

from ..demo import SAMPLE_DIR
from ..errors import FemurSegError
from .safety import DEFAULT_MAX_UPLOAD_BYTES

DEFAULT_DATASETS_ROOT = Path("~/FemurSeg-datasets")


def open_roots(datasets_root: Path) -> list[Path]:
    """Folders whose files may be opened by path: the datasets root, the sample data and FEMURSEG_WEB_OPEN_ROOTS."""
    extra = [Path(p).expanduser().resolve() for p in os.environ.get("FEMURSEG_WEB_OPEN_ROOTS", "").split(os.pathsep)
             if p.strip()]
    return [datasets_root, SAMPLE_DIR.resolve(), *extra]


def max_upload_bytes() -> int:
    """The upload limit in bytes, from FEMURSEG_WEB_MAX_UPLOAD_MB when set."""
    text = os.environ.get("FEMURSEG_WEB_MAX_UPLOAD_MB", "")
    try:
        return int(float(text) * 1024**2) if text else DEFAULT_MAX_UPLOAD_BYTES
    except ValueError:
        raise FemurSegError(f"FEMURSEG_WEB_MAX_UPLOAD_MB='{text}' is not a number of megabytes.") from None


def check_port(host: str, port: int) -> None:
    """Refuse a port that cannot be bound (in use, or privileged) before the Slicer libraries load."""
    try:
        socket.create_server((host, port)).close()
    except OSError as error:
        reason = os.strerror(error.errno) if (error.errno or 0) > 0 else error.strerror or str(error)
        raise FemurSegError(f"Cannot serve on {host}:{port} ({reason}); choose another port with "
                            "--port.") from None


def serve(host: str = "127.0.0.1", port: int = 8080, datasets_root: Path | None = None,
          open_browser: bool = False) -> None:
    """Build the app and block serving it; exports go under ``datasets_root`` (created if missing)."""
    check_port(host, port)
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        # Headless machine: render offscreen through EGL (must be chosen before VTK is imported).
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    from .app import FemurSegWebApp  # imports the Slicer libraries: only when actually serving

    root = (datasets_root or DEFAULT_DATASETS_ROOT).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FemurSegError(f"Cannot create the datasets root {root}: {error.strerror}.") from None
    root = root.resolve()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("FemurSegLib").setLevel(logging.INFO)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger(__name__).warning(
            "Serving on %s: anyone who can reach it can open files under %s and write datasets there "
            "(there is no login).", host, ", ".join(str(r) for r in open_roots(root)))
    server = get_server("femurseg", client_type="vue3")
    app = FemurSegWebApp(root, open_roots(root), max_upload_bytes(), server=server)
    try:
        server.start(host=host, port=port, open_browser=open_browser, timeout=0, show_connection_info=True)
    finally:
        app.workflow.close()
