"""HU -> equivalent mineral density (mg/cm^3), from calibration-phantom rods or from the patient's own tissues.

QCT density is only as good as its calibration: a straight line fitted by least squares through the rods' known
densities against their mean HU (slope, intercept, R^2 and residuals are reported, so a rod placed wrongly shows).
Rods are K2HPO4 or hydroxyapatite (HA); the material is carried with the fit because the density laws expect one of
them (materials.py) and the two are not interchangeable (K2HPO4 and HA phantoms of the same nominal density differ).

Phantomless ("internal") calibration (Michalski et al. 2020, Med Eng Phys 78:55) fits the same line through tissues
of the scan itself: air, fat, muscle and cortical bone, measured here from the CT and the label, against nominal
HA-equivalent densities. The nominal values (INTERNAL_REFERENCE_HA) are *not* a cross-calibration of any scanner:
they are the tissues' typical HU at 120 kVp times 0.8 mg/cm^3 per HU, a typical QCT slope. For quantitative work give
a rods file with the values of a cross-calibration on your scanner instead (same format, tissue names as rod names).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import FemurSegError

MATERIALS = ("HA", "K2HPO4")
MAX_ROD_FILE_BYTES = 1 << 20  # a rods file is a few lines; more is not one
# name: (nominal HU at 120 kVp, nominal HA-equivalent density in mg/cm^3 = 0.8 x HU); see the module docstring
INTERNAL_REFERENCE_HA = {"air": (-1000.0, -800.0), "fat": (-100.0, -80.0), "muscle": (50.0, 40.0),
                         "cortical bone": (1500.0, 1200.0)}
MIN_TISSUE_VOXELS = 50  # fewer voxels of a tissue give no trustworthy mean


@dataclass(frozen=True)
class Rod:
    """One calibration point: a rod (or tissue) of known equivalent density and its mean HU in this CT."""

    name: str
    density_mg_cm3: float
    hu: float


@dataclass(frozen=True)
class Calibration:
    """density (mg/cm^3) = slope x HU + intercept, with the fit's quality and where it came from."""

    material: str  # "HA" or "K2HPO4": what the densities are equivalent to
    method: str  # "rods" or "internal"
    slope: float  # mg/cm^3 per HU
    intercept: float  # mg/cm^3
    r_squared: float
    rods: tuple[Rod, ...] = field(default=())

    def density(self, hu: np.ndarray) -> np.ndarray:
        """Equivalent density in mg/cm^3 for HU values."""
        return self.slope * np.asarray(hu, dtype=np.float64) + self.intercept

    def residuals(self) -> list[float]:
        """Known minus fitted density of each rod, mg/cm^3."""
        return [rod.density_mg_cm3 - float(self.density(rod.hu)) for rod in self.rods]

    def describe(self) -> str:
        worst = max((abs(r) for r in self.residuals()), default=0.0)
        return (f"{self.method} calibration ({self.material}, {len(self.rods)} points): density = "
                f"{self.slope:.4f} mg/cm^3/HU x HU {self.intercept:+.2f} mg/cm^3, R^2 {self.r_squared:.4f}, "
                f"largest residual {worst:.1f} mg/cm^3")

    def as_dict(self) -> dict:
        return {"material": self.material, "method": self.method, "units": "mg/cm^3 per HU; mg/cm^3",
                "slope": self.slope, "intercept": self.intercept, "r_squared": self.r_squared,
                "points": [{"name": r.name, "density_mg_cm3": r.density_mg_cm3, "hu": r.hu,
                            "residual_mg_cm3": res} for r, res in zip(self.rods, self.residuals())]}


def fit_calibration(rods: list[Rod], material: str, method: str = "rods") -> Calibration:
    """Least-squares line through the rods; refuses too few rods, repeated densities and rods out of order."""
    if material not in MATERIALS:
        raise FemurSegError(f"Calibration material '{material}' must be one of {', '.join(MATERIALS)}.")
    if len(rods) < 2:
        raise FemurSegError(f"The calibration has {len(rods)} rod{'s' if len(rods) != 1 else ''}; a density fit "
                            "needs at least 2 (3 or more to see a bad one).")
    ordered = sorted(rods, key=lambda rod: rod.density_mg_cm3)
    for low, high in zip(ordered, ordered[1:]):
        if high.density_mg_cm3 == low.density_mg_cm3:
            raise FemurSegError(f"Rods '{low.name}' and '{high.name}' have the same density "
                                f"({low.density_mg_cm3:g} mg/cm^3); each rod needs its own.")
        if high.hu <= low.hu:
            raise FemurSegError(f"Rods out of order: '{high.name}' ({high.density_mg_cm3:g} mg/cm^3) reads "
                                f"{high.hu:g} HU, not more than '{low.name}' ({low.density_mg_cm3:g} mg/cm^3, "
                                f"{low.hu:g} HU); check which rod is which.")
    hu = np.array([rod.hu for rod in rods])
    density = np.array([rod.density_mg_cm3 for rod in rods])
    slope, intercept = np.polyfit(hu, density, 1)
    fitted = slope * hu + intercept
    spread = float(np.sum((density - density.mean()) ** 2))
    r_squared = 1.0 - float(np.sum((density - fitted) ** 2)) / spread
    return Calibration(material=material, method=method, slope=float(slope), intercept=float(intercept),
                       r_squared=r_squared, rods=tuple(rods))


def _number(text: object, what: str, path: Path) -> float:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise FemurSegError(f"Calibration file '{path}': {what} '{text}' is not a number.") from None
    if not np.isfinite(value):
        raise FemurSegError(f"Calibration file '{path}': {what} is {value}; give a finite number.")
    return value


def read_rods(path: str | os.PathLike) -> Calibration:
    """Fit the rods of a CSV (columns density_mg_cm3, hu; optional name, material) or JSON
    ({"material": "HA"|"K2HPO4", "rods": [{"name", "density_mg_cm3", "hu"}, ...]}). Material defaults to HA."""
    path = Path(path)
    if not path.is_file():
        raise FemurSegError(f"Calibration file '{path}' does not exist or is not a file.")
    if path.stat().st_size > MAX_ROD_FILE_BYTES:
        raise FemurSegError(f"Calibration file '{path}' is larger than {MAX_ROD_FILE_BYTES} bytes; it is not a list "
                            "of rods.")
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise FemurSegError(f"Calibration file '{path}' is not valid JSON ({error.msg}, line {error.lineno}).") \
                from None
        if not isinstance(data, dict) or not isinstance(data.get("rods", []), list):
            raise FemurSegError(f"Calibration file '{path}' must hold an object with a 'rods' list.")
        rows, material = data.get("rods", []), str(data.get("material", "HA"))
    else:
        reader = csv.DictReader(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
        missing = {"density_mg_cm3", "hu"} - set(reader.fieldnames or [])
        if missing:
            raise FemurSegError(f"Calibration file '{path}' has no column {' or '.join(sorted(missing))}; the header "
                                "must name density_mg_cm3 and hu (optional: name, material).")
        rows = list(reader)
        materials = {row.get("material") or "HA" for row in rows}
        if len(materials) > 1:
            raise FemurSegError(f"Calibration file '{path}' mixes materials {', '.join(sorted(materials))}; one "
                                "phantom, one material.")
        material = materials.pop() if materials else "HA"
    if not rows:
        raise FemurSegError(f"Calibration file '{path}' lists no rods; give each rod's density_mg_cm3 and mean hu.")
    rods = []
    for index, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise FemurSegError(f"Calibration file '{path}': rod {index} is not an object with density_mg_cm3 and hu.")
        rods.append(Rod(name=str(row.get("name") or f"rod {index}"),
                        density_mg_cm3=_number(row.get("density_mg_cm3"), f"rod {index} density_mg_cm3", path),
                        hu=_number(row.get("hu"), f"rod {index} hu", path)))
    canonical = {known.lower(): known for known in MATERIALS}.get(material.strip().lower(), material)
    return fit_calibration(rods, canonical, "rods")


def measure_tissues(ct: sitk.Image, femur: np.ndarray) -> list[Rod]:
    """Mean HU of air, fat, muscle and cortical bone in this CT, each paired with its nominal HA density.

    Air: below -900 HU; fat: -190 to -30 HU; muscle: 10 to 90 HU (each outside the femur); cortical bone: the
    brightest 5 % of the femur's voxels. A tissue with too few voxels (a specimen scanned in water has no fat) is
    left out; fit_calibration then says whether enough are left."""
    hu = sitk.GetArrayViewFromImage(ct)
    outside = ~femur
    windows = {"air": (-1e9, -900.0), "fat": (-190.0, -30.0), "muscle": (10.0, 90.0)}
    rods = []
    for name, (low, high) in windows.items():
        values = hu[outside & (hu > low) & (hu < high)]
        if values.size >= MIN_TISSUE_VOXELS:
            rods.append(Rod(name, INTERNAL_REFERENCE_HA[name][1], float(values.mean())))
    bone = hu[femur]
    if bone.size >= MIN_TISSUE_VOXELS:
        cortex = bone[bone >= np.percentile(bone, 95)]
        rods.append(Rod("cortical bone", INTERNAL_REFERENCE_HA["cortical bone"][1], float(cortex.mean())))
    return rods


def internal_calibration(ct: sitk.Image, femur: np.ndarray) -> Calibration:
    """Phantomless calibration from the scan's own tissues (see the module docstring for what it is worth)."""
    rods = measure_tissues(ct, femur)
    if len(rods) < 2:
        raise FemurSegError("Internal calibration found fewer than 2 of air, fat, muscle and cortical bone in the CT; "
                            "give a rods file with --calibration.")
    return fit_calibration(rods, "HA", "internal")
