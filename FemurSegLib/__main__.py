"""``python -m FemurSegLib …`` is the same as ``femurseg …`` (used by GUIs that run inference in a subprocess)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
