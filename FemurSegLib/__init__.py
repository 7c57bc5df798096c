"""FemurSegLib: the Qt-free core of the FemurSeg Slicer extension.

Every front end (the Slicer module, the ``femurseg`` CLI, the browser app and the tests) calls the functions
in these modules; nothing here imports ``qt``, ``ctk`` or ``slicer.app``.
"""

__version__ = "0.1.0"
