"""What every writer takes: mesh, per-element density and modulus, material bins and named node sets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .materials import MaterialBins


@dataclass(frozen=True)
class FEModel:
    """A femur FE model in mm, N, MPa; node and element numbers in files are these indices + 1."""

    points: np.ndarray  # (n, 3) LPS mm
    cells: np.ndarray  # (m, 4) or (m, 10), VTK / Abaqus node order
    density_mg_cm3: np.ndarray  # (m,) mean equivalent density over each element
    modulus_mpa: np.ndarray  # (m,) mean Young's modulus over each element
    poisson: float
    bins: MaterialBins
    node_sets: dict[str, np.ndarray]  # name -> 0-based node indices
    load_directions: dict[str, list[float]]  # load case -> unit vector (LPS) of the load on the head

    @property
    def quadratic(self) -> bool:
        return self.cells.shape[1] == 10
