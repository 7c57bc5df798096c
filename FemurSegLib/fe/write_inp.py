"""Abaqus input file (.inp): C3D4 or C3D10, one element set, section and *MATERIAL per modulus bin, node sets.

meshio writes .inp but drops materials (DESIGN.md §10), so the keywords are written here; meshio reads the file back
in the tests. Units mm, N, MPa (Abaqus has none of its own: these must agree, and do).
"""

from __future__ import annotations

import io
import os

import numpy as np

from ..imageio import atomic_path
from .model import FEModel


def _id_lines(ids: np.ndarray, per_line: int = 16) -> str:
    """1-based ids, at most 16 to a data line as Abaqus requires."""
    ids = np.asarray(ids) + 1
    return "\n".join(", ".join(map(str, ids[i:i + per_line])) for i in range(0, len(ids), per_line)) + "\n"


def write_inp(model: FEModel, path: str | os.PathLike) -> None:
    out = io.StringIO()
    out.write("*HEADING\nFemurSeg FE model of a femur: mm, N, MPa; LPS coordinates\n")
    out.write("*NODE, NSET=ALLNODES\n")
    nodes = np.column_stack([np.arange(1, len(model.points) + 1), model.points])
    np.savetxt(out, nodes, fmt=["%d", "%.9g", "%.9g", "%.9g"], delimiter=", ")
    kind = "C3D10" if model.quadratic else "C3D4"
    out.write(f"*ELEMENT, TYPE={kind}, ELSET=FEMUR\n")
    elements = np.column_stack([np.arange(1, len(model.cells) + 1), model.cells + 1])
    np.savetxt(out, elements, fmt="%d", delimiter=", ")
    for bin_index, modulus in enumerate(model.bins.modulus, 1):
        members = np.flatnonzero(model.bins.index == bin_index - 1)
        out.write(f"*ELSET, ELSET=MAT{bin_index}\n" + _id_lines(members))
        out.write(f"*SOLID SECTION, ELSET=MAT{bin_index}, MATERIAL=BONE{bin_index}\n,\n")
    for name, nodes_in_set in model.node_sets.items():
        out.write(f"*NSET, NSET={name}\n" + _id_lines(nodes_in_set))
    for bin_index, modulus in enumerate(model.bins.modulus, 1):
        out.write(f"*MATERIAL, NAME=BONE{bin_index}\n*ELASTIC\n{modulus:.6g}, {model.poisson:g}\n")
    with atomic_path(path) as temporary:
        temporary.write_text(out.getvalue())
