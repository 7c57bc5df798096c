"""Named node sets for the standard load cases of a proximal femur, found from the mesh's own shape.

Boundary conditions alone can change a femur model's stiffness by up to 280 % (DESIGN.md §10), so they are named and
exported, not left to each user's clicking. The sets come from the principal axis of the nodes (the shaft, for a
proximal femur longer than it is wide); the proximal end is the end whose last fifth spreads wider (head and
trochanter); the medial direction points from the axis to the top of the head (its most proximal surface point).

- DISTAL_FIXATION: every node within ``DISTAL_FRACTION`` of the length from the distal end (the potted or cut end,
  fixed in both tests);
- HEAD_STANCE: surface nodes within ``CAP_FRACTION`` of the length of the most proximal point (the head's top: load
  along the shaft, as in single-leg stance, Keyak 1998);
- HEAD_FALL: surface nodes of the proximal fifth within that distance of the most medial point (the head's medial
  face, loaded in a sideways fall, Dragomir-Daescu 2011);
- TROCHANTER_FALL: surface nodes of the proximal fifth within that distance of the most lateral point (the greater
  trochanter's support in a sideways fall).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DISTAL_FRACTION = 0.10
CAP_FRACTION = 0.05
END_FRACTION = 0.20


@dataclass(frozen=True)
class LoadCases:
    """Node sets (0-based indices) and the directions that go with them (unit vectors in LPS)."""

    sets: dict[str, np.ndarray]
    axis: np.ndarray  # distal -> proximal
    medial: np.ndarray  # from the shaft towards the head, perpendicular to the axis

    def directions(self) -> dict[str, list[float]]:
        """Load directions: stance pushes the head towards the distal end, the fall pushes it laterally."""
        return {"stance": (-self.axis).tolist(), "fall": (-self.medial).tolist()}


def surface_nodes(corners: np.ndarray) -> np.ndarray:
    """Nodes on the boundary faces of a tetrahedral mesh (faces that belong to one element only)."""
    faces = np.concatenate([corners[:, [1, 2, 3]], corners[:, [0, 2, 3]], corners[:, [0, 1, 3]],
                            corners[:, [0, 1, 2]]])
    unique, counts = np.unique(np.sort(faces, axis=1), axis=0, return_counts=True)
    return np.unique(unique[counts == 1])


def find_load_cases(points: np.ndarray, corners: np.ndarray) -> LoadCases:
    """The four node sets of the module docstring for a mesh of one proximal femur (nodes: corners only)."""
    nodes = np.unique(corners)
    centre = points[nodes].mean(axis=0)
    _, _, vt = np.linalg.svd(points[nodes] - centre, full_matrices=False)
    axis = vt[0]
    t = (points - centre) @ axis
    low, high = float(t[nodes].min()), float(t[nodes].max())
    length = high - low

    def spread(mask: np.ndarray) -> float:
        radial = points[mask] - centre - np.outer(t[mask], axis)
        return float(np.linalg.norm(radial, axis=1).max(initial=0.0))

    in_mesh = np.zeros(len(points), dtype=bool)
    in_mesh[nodes] = True
    if spread(in_mesh & (t < low + END_FRACTION * length)) > spread(in_mesh & (t > high - END_FRACTION * length)):
        axis, t, low, high = -axis, -t, -high, -low
    surface = surface_nodes(corners)
    top = surface[np.argmax(t[surface])]
    radial = points[top] - centre - t[top] * axis
    medial = radial / max(float(np.linalg.norm(radial)), 1e-12)
    m = (points - centre) @ medial
    cap = CAP_FRACTION * length
    proximal = surface[t[surface] > high - END_FRACTION * length]
    sets = {
        "DISTAL_FIXATION": nodes[t[nodes] <= low + DISTAL_FRACTION * length],
        "HEAD_STANCE": surface[t[surface] >= high - cap],
        "HEAD_FALL": proximal[m[proximal] >= m[proximal].max() - cap],
        "TROCHANTER_FALL": proximal[m[proximal] <= m[proximal].min() + cap],
    }
    return LoadCases(sets, axis, medial)
