"""A check that the exported model is solvable: a linear-elastic solve with scikit-fem (BSD), whole-bone stiffness.

The stance check fixes DISTAL_FIXATION (all components) and moves HEAD_STANCE rigidly by 1 mm along the load
direction (a rigid pad: all three components prescribed); the stiffness is the reaction force along that direction
per mm, N/mm (conjugate gradients, Jacobi-preconditioned). Linear tetrahedra on the corner nodes (a quadratic mesh is checked on its corners: the check is that
the model solves and how stiff it is, not the last per cent). ``slip=True`` (axis-aligned loads only) prescribes
only the axial component at both ends, with rigid-body motion removed: a prism then carries uniform stress, and its
stiffness is E A / L exactly, which the tests use.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import diags
from scipy.sparse.linalg import cg

from ..errors import FemurSegError

RTOL = 1e-8  # conjugate gradients with a Jacobi preconditioner: a direct solve of a 2 mm femur needs ~3 GB
MAX_ITERATIONS = 20_000


def axial_stiffness(points: np.ndarray, corners: np.ndarray, modulus: np.ndarray, poisson: float,
                    fixed: np.ndarray, loaded: np.ndarray, direction: np.ndarray, slip: bool = False) -> float:
    """Reaction force along ``direction`` per unit displacement of ``loaded`` (N/mm), ``fixed`` held."""
    from skfem import Basis, BilinearForm, ElementTetP1, ElementVector, MeshTet
    from skfem.helpers import ddot, sym_grad, trace

    if len(fixed) == 0 or len(loaded) == 0:
        raise FemurSegError("The stiffness check needs fixed and loaded nodes; a node set is empty.")
    used, local = np.unique(corners, return_inverse=True)
    renumber = np.full(len(points), -1)
    renumber[used] = np.arange(len(used))
    mesh = MeshTet(points[used].T, local.reshape(-1, 4).T)
    basis = Basis(mesh, ElementVector(ElementTetP1()))
    lam = modulus * poisson / ((1 + poisson) * (1 - 2 * poisson))
    mu = modulus / (2 * (1 + poisson))
    quadrature_points = basis.X.shape[-1]

    @BilinearForm
    def elasticity(u, v, w):
        strain_u, strain_v = sym_grad(u), sym_grad(v)
        return 2.0 * w["mu"] * ddot(strain_u, strain_v) + w["lam"] * trace(strain_u) * trace(strain_v)

    stiffness = elasticity.assemble(basis, lam=np.repeat(lam[:, None], quadrature_points, axis=1),
                                    mu=np.repeat(mu[:, None], quadrature_points, axis=1)).tocsr()
    dofs = basis.nodal_dofs  # (3, nodes)
    fixed, loaded = renumber[fixed], renumber[loaded]
    direction = np.asarray(direction, dtype=np.float64) / np.linalg.norm(direction)
    displacement = np.zeros(stiffness.shape[0])
    if slip:
        component = int(np.argmax(np.abs(direction)))
        if not np.isclose(abs(direction[component]), 1.0):
            raise FemurSegError("slip=True needs a load along a coordinate axis.")
        transverse = [c for c in range(3) if c != component]
        first = fixed[0]
        second = fixed[np.argmax(np.linalg.norm(mesh.p.T[fixed] - mesh.p.T[first], axis=1))]
        offset = mesh.p.T[second] - mesh.p.T[first]
        across = transverse[int(np.argmin(np.abs(offset[transverse])))]  # the one that stops rotation about the axis
        prescribed = np.concatenate([dofs[component, fixed], dofs[component, loaded], dofs[transverse, first],
                                     [dofs[across, second]]])
        displacement[dofs[component, loaded]] = np.sign(direction[component])
        reaction_dofs = [dofs[component, loaded]]
        reaction_weights = [np.full(len(loaded), np.sign(direction[component]))]
    else:
        prescribed = np.concatenate([dofs[:, fixed].ravel(), dofs[:, loaded].ravel()])
        displacement[dofs[:, loaded]] = direction[:, None]
        reaction_dofs = [dofs[c, loaded] for c in range(3)]
        reaction_weights = [np.full(len(loaded), direction[c]) for c in range(3)]
    prescribed = np.unique(prescribed)
    free = np.setdiff1d(np.arange(stiffness.shape[0]), prescribed)
    rhs = -stiffness[free][:, prescribed] @ displacement[prescribed]
    reduced = stiffness[free][:, free].tocsr()
    solution, info = cg(reduced, rhs, rtol=RTOL, maxiter=MAX_ITERATIONS, M=diags(1.0 / reduced.diagonal()))
    if info != 0 or not np.all(np.isfinite(solution)):
        raise FemurSegError("The stiffness check did not converge: the model is not held enough, or its moduli span "
                            "too wide a range.")
    displacement[free] = solution
    reaction = stiffness @ displacement
    return float(sum(float(reaction[d] @ w) for d, w in zip(reaction_dofs, reaction_weights)))
