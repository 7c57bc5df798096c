"""Density -> Young's modulus laws for bone, and moduli grouped into material bins.

Every law takes the calibrated QCT density (g/cm^3, equivalent to the phantom material the law was derived with),
converts it to ash density and gives E in MPa; negative densities (fat, air at the surface) are clamped to 0 before
the power law and E never falls below ``floor_mpa`` (a solver needs every element stiff). Poisson's ratio 0.3.

- ``morgan`` (default): rho_ash = 0.877 rho_QCT + 0.079 (Schileo et al. 2008, J Biomech 41:356, HA-calibrated QCT),
  rho_app = rho_ash / 0.6 (Schileo 2008), E = 6850 rho_app^1.49 (Morgan et al. 2003, J Biomech 36:897, femoral neck
  and pooled sites).
- ``keyak``: rho_ash = 1.22 rho_K2HPO4 + 0.0523 (Keyak et al. 1994, J Biomed Mater Res 28:1329, K2HPO4-calibrated
  QCT); E = 33900 rho_ash^2.20 (rho_ash <= 0.27), 5307 rho_ash + 469 (0.27 < rho_ash < 0.6), 10200 rho_ash^2.01
  (rho_ash >= 0.6) (Keyak et al. 1998 J Biomech 31:125; Keyak & Falkinstein 2003, Med Eng Phys 25:781).
- ``keller``: rho_ash from HA-calibrated QCT as for morgan (Schileo 2008); E = 10500 rho_ash^2.29 (Keller 1994,
  J Biomech 27:1159, human femur and vertebra).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ..errors import FemurSegError

POISSON = 0.3
FLOOR_MPA = 10.0  # fat and air at the bone's surface would otherwise give elements of almost no stiffness
DEFAULT_BINS = 100


@dataclass(frozen=True)
class DensityLaw(ABC):
    """One law: QCT density of ``material`` (HA or K2HPO4) -> ash density -> E (MPa)."""

    name: str
    material: str  # the calibration phantom material the law's density relation was derived with
    ash_slope: float
    ash_intercept: float  # g/cm^3
    reference: str

    def ash_density(self, rho_qct: np.ndarray) -> np.ndarray:
        """Ash density in g/cm^3 from QCT equivalent density in g/cm^3 (clamped at 0)."""
        return np.maximum(self.ash_slope * np.asarray(rho_qct, dtype=np.float64) + self.ash_intercept, 0.0)

    @abstractmethod
    def modulus_from_ash(self, rho_ash: np.ndarray) -> np.ndarray:
        """E in MPa from ash density in g/cm^3 (the law proper)."""

    def modulus(self, rho_qct: np.ndarray, floor_mpa: float = FLOOR_MPA) -> np.ndarray:
        """Young's modulus in MPa from QCT equivalent density in g/cm^3, never below ``floor_mpa``."""
        return np.maximum(self.modulus_from_ash(self.ash_density(rho_qct)), floor_mpa)


@dataclass(frozen=True)
class MorganLaw(DensityLaw):
    def modulus_from_ash(self, rho_ash: np.ndarray) -> np.ndarray:
        return 6850.0 * (rho_ash / 0.6) ** 1.49


@dataclass(frozen=True)
class KeyakLaw(DensityLaw):
    def modulus_from_ash(self, rho_ash: np.ndarray) -> np.ndarray:
        return np.where(rho_ash <= 0.27, 33900.0 * rho_ash ** 2.20,
                        np.where(rho_ash < 0.6, 5307.0 * rho_ash + 469.0, 10200.0 * rho_ash ** 2.01))


@dataclass(frozen=True)
class KellerLaw(DensityLaw):
    def modulus_from_ash(self, rho_ash: np.ndarray) -> np.ndarray:
        return 10500.0 * rho_ash ** 2.29


LAWS: dict[str, DensityLaw] = {
    "morgan": MorganLaw("morgan", "HA", 0.877, 0.079, "Schileo 2008 (ash), Morgan 2003 (E = 6850 rho_app^1.49)"),
    "keyak": KeyakLaw("keyak", "K2HPO4", 1.22, 0.0523, "Keyak 1994 (ash), Keyak & Falkinstein 2003 (piecewise E)"),
    "keller": KellerLaw("keller", "HA", 0.877, 0.079, "Schileo 2008 (ash), Keller 1994 (E = 10500 rho_ash^2.29)"),
}


def get_law(name: str) -> DensityLaw:
    if name not in LAWS:
        raise FemurSegError(f"Unknown density law '{name}'; choose one of {', '.join(LAWS)}.")
    return LAWS[name]


def material_warning(law: DensityLaw, calibration_material: str) -> str | None:
    """Say so when the calibration's phantom material is not the one the law was derived with."""
    if law.material == calibration_material:
        return None
    return (f"the calibration is {calibration_material}-equivalent but the {law.name} law expects "
            f"{law.material}-equivalent density; its moduli will be off (calibrate with a {law.material} phantom or "
            f"choose a {calibration_material} law)")


@dataclass(frozen=True)
class MaterialBins:
    """Elements grouped by modulus, for solvers that take one material per element set (Abaqus, Ansys)."""

    index: np.ndarray  # (elements,) bin of each element, 0-based
    modulus: np.ndarray  # (bins,) MPa: the mean E of the bin's elements

    @property
    def count(self) -> int:
        return len(self.modulus)


def bin_moduli(modulus: np.ndarray, bins: int = DEFAULT_BINS) -> MaterialBins:
    """Equal-width bins over the range of E; each bin's E is the mean of its elements', so the bins keep the
    model's mean modulus; empty bins are dropped. One element per bin (bins >= elements) keeps every E."""
    if bins < 1:
        raise FemurSegError(f"Material bins {bins}: give at least 1.")
    modulus = np.asarray(modulus, dtype=np.float64)
    low, high = float(modulus.min()), float(modulus.max())
    if high == low:
        return MaterialBins(np.zeros(len(modulus), dtype=np.int64), np.array([low]))
    raw = np.minimum(((modulus - low) / (high - low) * bins).astype(np.int64), bins - 1)
    used, index = np.unique(raw, return_inverse=True)
    sums = np.bincount(index, weights=modulus, minlength=len(used))
    counts = np.bincount(index, minlength=len(used))
    return MaterialBins(index.astype(np.int64), sums / counts)
