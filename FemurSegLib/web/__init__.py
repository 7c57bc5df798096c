"""FemurSeg in the browser: a trame-slicer app (real Slicer MRML views and Segment Editor) with a FemurSeg panel.

``femurseg web`` calls :func:`FemurSegLib.web.server.serve`. The scene work is shared with desktop Slicer
through :mod:`FemurSegLib.scene`; this package adds only the page, the upload/path checks and the glue.
"""
