"""VTK unstructured grid (.vtu, with meshio): the mesh with density, E and material bin per element and each node
set as a 0/1 point array, for ParaView and Slicer."""

from __future__ import annotations

import os

import meshio
import numpy as np

from ..imageio import atomic_path
from .model import FEModel


def write_vtu(model: FEModel, path: str | os.PathLike) -> None:
    kind = "tetra10" if model.quadratic else "tetra"
    mesh = meshio.Mesh(model.points, [(kind, model.cells)],
                       cell_data={"density_mg_cm3": [model.density_mg_cm3], "E_MPa": [model.modulus_mpa],
                                  "material_bin": [model.bins.index + 1]},
                       point_data={name: np.isin(np.arange(len(model.points)), nodes).astype(np.uint8)
                                   for name, nodes in model.node_sets.items()})
    with atomic_path(path) as temporary:
        meshio.write(temporary, mesh, file_format="vtu")
