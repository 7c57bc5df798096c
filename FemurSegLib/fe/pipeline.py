"""CT + corrected label -> FE model files: what ``femurseg fe`` (and any other front end) runs.

Order: check the outputs, read and check inputs (label on the CT's grid, one solid piece, an element size it can
carry), calibrate, mesh, map materials at Gauss points, find the load-case node sets, solve the stance case as a
check, write each requested format atomically and a provenance JSON that says how every number was made.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..errors import FemurSegError
from ..imageio import (check_output_path, prepare_output_folder, read_ct, read_label, require_same_grid,
                       write_bytes_atomic)
from ..iopolicy import file_sha256
from .calibration import Calibration, internal_calibration, read_rods
from .loadcases import find_load_cases
from .mapping import map_materials, points_per_direction
from .materials import DEFAULT_BINS, FLOOR_MPA, POISSON, bin_moduli, get_law, material_warning
from .mesh import MeshReport, femur_mask, mesh_label
from .model import FEModel
from .solve import axial_stiffness
from .write_cdb import write_cdb
from .write_feb import write_feb
from .write_inp import write_inp
from .write_vtu import write_vtu

WRITERS: dict[str, Callable[[FEModel, Path], None]] = {"inp": write_inp, "feb": write_feb, "cdb": write_cdb,
                                                       "vtu": write_vtu}
FORMATS = tuple(WRITERS)
STEM = "femur"


@dataclass(frozen=True)
class FEOptions:
    element_size: float = 2.0  # mm; ~2 in vivo, ~1 ex vivo
    quadratic: bool = False
    law: str = "morgan"
    bins: int = DEFAULT_BINS
    formats: tuple[str, ...] = FORMATS
    floor_mpa: float = FLOOR_MPA
    poisson: float = POISSON
    value: int | None = None  # label value to mesh (default: the non-zero voxels, which must be one value)
    solve: bool = True

    def __post_init__(self) -> None:
        if not self.element_size > 0 or self.element_size == float("inf"):  # before any folder is made (batch too)
            raise FemurSegError(f"Element size {self.element_size} mm must be a positive number of millimetres.")
        get_law(self.law)
        unknown = [f for f in self.formats if f not in WRITERS]
        if unknown or not self.formats:
            raise FemurSegError(f"Format(s) {', '.join(unknown) or '(none)'} unknown; give some of "
                                f"{', '.join(FORMATS)}, separated by commas.")
        if self.bins < 1:
            raise FemurSegError(f"Material bins {self.bins}: give at least 1.")


@dataclass(frozen=True)
class FEResult:
    model: FEModel
    mesh: MeshReport
    calibration: Calibration
    stiffness_n_mm: float | None
    warnings: tuple[str, ...]
    files: dict[str, Path]
    seconds: dict[str, float]


def build_model(ct: sitk.Image, label: sitk.Image, calibration: Calibration, options: FEOptions,
                seconds: dict[str, float] | None = None) -> tuple[FEModel, MeshReport]:
    """Mesh, map and group materials; ``seconds`` gets each step's wall time."""
    seconds = {} if seconds is None else seconds
    start = time.perf_counter()
    mesh, report = mesh_label(label, options.element_size, options.quadratic, options.value)
    seconds["mesh"] = time.perf_counter() - start
    start = time.perf_counter()
    values = map_materials(ct, mesh.points, mesh.corners, calibration, get_law(options.law),
                           points_per_direction(options.element_size, ct.GetSpacing()), options.floor_mpa)
    load_cases = find_load_cases(mesh.points, mesh.corners)
    seconds["map"] = time.perf_counter() - start
    model = FEModel(points=mesh.points, cells=mesh.cells, density_mg_cm3=values.density_mg_cm3,
                    modulus_mpa=values.modulus_mpa, poisson=options.poisson,
                    bins=bin_moduli(values.modulus_mpa, options.bins), node_sets=load_cases.sets,
                    load_directions=load_cases.directions())
    return model, report


def stance_stiffness(model: FEModel) -> float:
    """Whole-femur stiffness in the stance case, N/mm (see solve.py)."""
    return axial_stiffness(model.points, model.cells[:, :4], model.modulus_mpa, model.poisson,
                           model.node_sets["DISTAL_FIXATION"], model.node_sets["HEAD_STANCE"],
                           np.array(model.load_directions["stance"]))


def output_files(out_dir: Path, formats: tuple[str, ...]) -> dict[str, Path]:
    return {kind: out_dir / f"{STEM}.{kind}" for kind in formats}


def run_fe(ct_path: str | os.PathLike, label_path: str | os.PathLike, out_dir: str | os.PathLike,
           calibration: str, options: FEOptions, notify: Callable[[str], None] = lambda message: None,
           progress: Callable[[float, str], None] | None = None) -> FEResult:
    """The whole job. ``calibration`` is a rods file (.csv or .json) or ``internal``; ``progress`` gets
    (fraction, stage) as each step starts, for the GUIs' progress bars."""
    progress = progress or (lambda fraction, stage: None)
    out_dir = prepare_output_folder(out_dir)
    files = output_files(out_dir, options.formats)
    provenance_path = out_dir / f"{STEM}.json"
    inputs = (ct_path, label_path) + (() if calibration == "internal" else (calibration,))
    for path in [*files.values(), provenance_path]:
        check_output_path(path, inputs, suffixes=None, what="FE model file")
    progress(0.0, "reading")
    ct = read_ct(ct_path)
    label = read_label(label_path)
    require_same_grid(ct, label, "the CT", "the label")
    law = get_law(options.law)
    if calibration == "internal":
        fit = internal_calibration(ct, femur_mask(label, options.value))
        warnings = ["internal calibration uses nominal tissue densities, not a cross-calibration of this scanner; "
                    "give a rods file for quantitative moduli"]
    else:
        fit = read_rods(calibration)
        warnings = []
    mismatch = material_warning(law, fit.material)
    if mismatch:
        warnings.append(mismatch)
    if fit.r_squared < 0.95 and len(fit.rods) > 2:
        warnings.append(f"the calibration fit is poor (R^2 {fit.r_squared:.3f}); check the rods' values")
    notify(fit.describe())
    seconds: dict[str, float] = {}
    progress(0.1, "meshing and mapping")
    model, report = build_model(ct, label, fit, options, seconds)
    notify(f"mesh: {report.describe()}")
    if abs(report.volume_error) > 0.01:
        warnings.append(f"the mesh's volume differs from the label's by {100 * report.volume_error:+.1f} %")
    stiffness = None
    if options.solve:
        progress(0.6, "solving the stance case")
        start = time.perf_counter()
        stiffness = stance_stiffness(model)
        seconds["solve"] = time.perf_counter() - start
    progress(0.85, "writing")
    start = time.perf_counter()
    for kind, path in files.items():
        WRITERS[kind](model, path)
    seconds["write"] = time.perf_counter() - start
    provenance = {
        "femurseg_version": __version__,
        "ct": {"path": str(Path(ct_path).resolve()), "sha256": file_sha256(Path(ct_path))},
        "label": {"path": str(Path(label_path).resolve()), "sha256": file_sha256(Path(label_path)),
                  "value": options.value},
        "units": {"length": "mm", "force": "N", "modulus": "MPa", "density": "mg/cm^3 equivalent"},
        "coordinates": "LPS",
        "calibration": fit.as_dict(),
        "law": {"name": law.name, "expects": law.material, "reference": law.reference,
                "ash_density": f"{law.ash_slope} rho_QCT + {law.ash_intercept} g/cm^3", "floor_mpa": options.floor_mpa,
                "poisson": options.poisson, "integration": "element mean of E over Gauss points (mapping.py)"},
        "mesh": {**report.as_dict(), "quadratic": options.quadratic, "mesher": "pytetwild (fTetWild)"},
        "materials": {"bins": model.bins.count, "modulus_mpa": [float(model.modulus_mpa.min()),
                                                                 float(np.median(model.modulus_mpa)),
                                                                 float(model.modulus_mpa.max())]},
        "node_sets": {name: int(len(nodes)) for name, nodes in model.node_sets.items()},
        "load_directions": model.load_directions,
        "stance_stiffness_n_mm": stiffness,
        "warnings": warnings,
        "files": {kind: path.name for kind, path in files.items()},
        "seconds": seconds,
    }
    write_bytes_atomic(provenance_path, (json.dumps(provenance, indent=2) + "\n").encode())
    files["json"] = provenance_path
    progress(1.0, "done")
    return FEResult(model, report, fit, stiffness, tuple(warnings), files, seconds)
