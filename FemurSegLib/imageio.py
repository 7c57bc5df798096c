"""Reading and writing 3D images with their geometry kept, and atomic file writes.

SimpleITK does the I/O (NRRD, NIfTI, MHA); this module adds the checks that turn its exceptions and odd
inputs (2D, 4D, vector, empty) into one-line messages, and writes every file through a temporary file in
the same folder followed by a rename, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from .errors import FemurSegError

_UMASK = os.umask(0)
os.umask(_UMASK)

IMAGE_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha", ".mhd", ".seg.nrrd")


def image_suffix(path: str | os.PathLike) -> str:
    """The full image extension of ``path`` (``.nii.gz`` counts as one)."""
    name = Path(path).name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return Path(path).suffix.lower()


def read_image(path: str | os.PathLike, what: str = "image") -> sitk.Image:
    """Read a 3D scalar image, or raise FemurSegError saying why it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise FemurSegError(f"{what} '{path}' does not exist or is not a file.")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reader error"
        raise FemurSegError(
            f"{what} '{path}' could not be read as an image (NRRD, NIfTI or MHA expected): {first_line}"
        ) from None
    check_volume(image, f"{what} '{path}'")
    return image


def check_volume(image: sitk.Image, what: str) -> None:
    """Refuse images that are not 3D, single-component and non-empty."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise FemurSegError(
            f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "a single-channel CT volume is needed (convert colour or vector images to scalar first)."
        )
    if image.GetDimension() != 3:
        raise FemurSegError(f"{what} is {image.GetDimension()}D; FemurSeg needs a 3D volume.")
    size = image.GetSize()
    if min(size) < 2:
        raise FemurSegError(f"{what} has size {list(size)}: it is a single slice or empty; a 3D volume is needed.")


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    """True when both images have the same size, spacing, origin and direction."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)
    )


def describe_grid(image: sitk.Image) -> str:
    spacing = ", ".join(f"{s:g}" for s in image.GetSpacing())
    origin = ", ".join(f"{o:g}" for o in image.GetOrigin())
    return f"size {list(image.GetSize())}, spacing ({spacing}) mm, origin ({origin})"


def require_same_grid(reference: sitk.Image, other: sitk.Image, reference_name: str, other_name: str) -> None:
    if not same_grid(reference, other):
        raise FemurSegError(
            f"{other_name} is not on the same voxel grid as {reference_name}: "
            f"{describe_grid(other)} vs {describe_grid(reference)}. Resample it onto the {reference_name} first."
        )


def mask_array(image: sitk.Image) -> np.ndarray:
    """Boolean array (z, y, x) of the voxels with a non-zero label."""
    return sitk.GetArrayViewFromImage(image) != 0


def label_image_like(mask: np.ndarray, reference: sitk.Image, value: int = 1) -> sitk.Image:
    """A uint8 label image on ``reference``'s grid from a boolean (z, y, x) array."""
    label = sitk.GetImageFromArray(mask.astype(np.uint8) * np.uint8(value))
    label.CopyInformation(reference)
    return label


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final_path``; rename it into place only if the block succeeds."""
    final_path = Path(final_path)
    folder = final_path.parent
    if not folder.is_dir():
        raise FemurSegError(f"Output folder '{folder}' does not exist; create it first.")
    suffix = image_suffix(final_path) or ".tmp"
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=f".part{suffix}", dir=folder)
    except PermissionError:
        raise FemurSegError(f"Cannot write into '{folder}': permission denied. Choose a writable folder.") from None
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        os.chmod(temporary_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        _fsync_file(temporary_path)
        os.replace(temporary_path, final_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary_path.unlink()
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as temporary:
        try:
            temporary.write_bytes(data)
        except OSError as error:
            raise FemurSegError(f"Could not write '{path}': {error.strerror or error}.") from None


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write ``image`` atomically; the file appears under ``path`` complete or not at all."""
    with atomic_path(path) as temporary:
        try:
            sitk.WriteImage(image, str(temporary), compress)
        except RuntimeError as error:
            message = str(error).strip().splitlines()[-1] if str(error).strip() else "write failed"
            raise FemurSegError(f"Could not write '{path}': {message}") from None
