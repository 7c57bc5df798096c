"""Ansys Mechanical APDL archive (.cdb, with mapdl-archive): SOLID185-family tetrahedra or SOLID187, one material
number per modulus bin (MP,EX and MP,PRXY appended, which mapdl-archive does not write), node sets as components."""

from __future__ import annotations

import os

import numpy as np

from ..imageio import atomic_path
from .model import FEModel


def write_cdb(model: FEModel, path: str | os.PathLike) -> None:
    import pyvista
    from mapdl_archive import save_as_archive

    kind = pyvista.CellType.QUADRATIC_TETRA if model.quadratic else pyvista.CellType.TETRA
    grid = pyvista.UnstructuredGrid({kind: np.ascontiguousarray(model.cells, dtype=np.int64)},
                                   np.ascontiguousarray(model.points))
    grid.cell_data["ansys_material_type"] = (model.bins.index + 1).astype(np.int32)
    for name, nodes in model.node_sets.items():
        grid.point_data[name] = np.isin(np.arange(len(model.points)), nodes)
    materials = "".join(f"MP,EX,{number},{modulus:.6g}\nMP,PRXY,{number},{model.poisson:g}\n"
                        for number, modulus in enumerate(model.bins.modulus, 1))
    with atomic_path(path) as temporary:
        save_as_archive(temporary, grid, include_surface_elements=False, reset_etype=True,
                        comments=["FemurSeg FE model of a femur: mm, N, MPa; LPS coordinates"])
        with open(temporary, "a", encoding="ascii") as handle:
            handle.write(materials)
