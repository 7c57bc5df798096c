"""FEBio input file (.feb, format 4.0): one isotropic elastic material whose E is mapped per element.

Per-element E is FEBio's mapped parameter (``<E type="map">``) with the values in MeshData/ElementData, so no binning
is needed; node sets are FEBio NodeSets. Units mm, N, MPa (``<units>mm-N-s</units>``).
"""

from __future__ import annotations

import io
import os

import numpy as np

from ..imageio import atomic_path
from .model import FEModel

DOMAIN = "Femur"
MAP = "E_element"


def write_feb(model: FEModel, path: str | os.PathLike) -> None:
    out = io.StringIO()
    kind = "tet10" if model.quadratic else "tet4"
    out.write('<?xml version="1.0" encoding="UTF-8"?>\n<febio_spec version="4.0">\n'
              '  <Module type="solid">\n    <units>mm-N-s</units>\n  </Module>\n'
              '  <Material>\n    <material id="1" name="Bone" type="isotropic elastic">\n'
              f'      <density>1</density>\n      <E type="map">{MAP}</E>\n      <v>{model.poisson:g}</v>\n'
              '    </material>\n  </Material>\n  <Mesh>\n    <Nodes name="FemurNodes">\n')
    for number, (x, y, z) in enumerate(model.points, 1):
        out.write(f'      <node id="{number}">{x:.9g},{y:.9g},{z:.9g}</node>\n')
    out.write(f'    </Nodes>\n    <Elements type="{kind}" name="{DOMAIN}">\n')
    for number, cell in enumerate(model.cells + 1, 1):
        out.write(f'      <elem id="{number}">{",".join(map(str, cell))}</elem>\n')
    out.write("    </Elements>\n")
    for name, nodes in model.node_sets.items():
        out.write(f'    <NodeSet name="{name}">{",".join(map(str, np.asarray(nodes) + 1))}</NodeSet>\n')
    out.write(f'  </Mesh>\n  <MeshDomains>\n    <SolidDomain name="{DOMAIN}" mat="Bone"/>\n  </MeshDomains>\n'
              f'  <MeshData>\n    <ElementData name="{MAP}" elem_set="{DOMAIN}">\n')
    for number, modulus in enumerate(model.modulus_mpa, 1):
        out.write(f'      <e lid="{number}">{modulus:.6g}</e>\n')
    out.write("    </ElementData>\n  </MeshData>\n</febio_spec>\n")
    with atomic_path(path) as temporary:
        temporary.write_text(out.getvalue())
