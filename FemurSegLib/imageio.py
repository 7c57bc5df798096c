"""Reading and writing 3D images with their geometry kept.

SimpleITK does the I/O (NRRD, NIfTI, MHA); this module adds the checks that turn its exceptions and odd
inputs (2D, 4D, vector, empty, truncated, blank, NaN, tiny, absurd spacing, degenerate directions, a CT given as a
label) into one-line messages. What may be opened and written, and how (regular files only, detached data files
confined, outputs never an input, atomic writes), is FemurSegLib.iopolicy's, which every reader and writer here
goes through.

Truncated files: ITK's NIfTI reader silently pads missing data with zeros and its MetaImage reader fails with a
misleading "No such file" after printing to stderr, so NIfTI and MetaImage files are measured against what their
header declares before they are read; ITK's NRRD reader refuses short data itself, with a clear message.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import FemurSegError
from .iopolicy import (atomic_path, check_against_inputs, check_detached_data, check_output_file,
                       disk_full_message, prepare_output_folder, require_input_file, shown, write_bytes_atomic)

__all__ = ["atomic_path", "prepare_output_folder", "write_bytes_atomic"]  # the I/O policy's, used through here too

IMAGE_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha", ".mhd", ".seg.nrrd")
OUTPUT_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha", ".seg.nrrd")  # one file each (.mhd writes two)
MAX_VOXELS = 2**30  # 2 GB as int16; more than nnU-Net or fill can handle in memory here
MIN_CT_SIZE = 8  # voxels along each axis: fewer cannot hold a femur (a 5x5x5 volume came out 98 % "femur")
CT_SPACING_MM = (0.005, 50.0)  # outside: metres or micrometres written as millimetres, or a broken header


def image_suffix(path: str | os.PathLike) -> str:
    """The full image extension of ``path`` (``.nii.gz`` counts as one)."""
    name = Path(path).name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return Path(path).suffix.lower()


HeaderCheck = Callable[[tuple[int, ...], tuple[float, ...]], None]  # (size, spacing) -> raises FemurSegError


def read_image(path: str | os.PathLike, what: str = "image", data_root: Path | None = None,
               detached: bool = True, header_check: HeaderCheck | None = None) -> sitk.Image:
    """Read a 3D scalar image, or raise FemurSegError saying why it cannot be used.

    The file must be a regular file (iopolicy.require_input_file); a detached header's data file must be one too,
    inside ``data_root`` (default: the header's folder), and is refused outright when ``detached`` is False (an
    upload holds one file). The header is checked before the voxels are read (no gigabytes read for a 4D file or
    an absurd size), with ``header_check(size, spacing)`` too: what the caller will need (budget.check_fill).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise FemurSegError(f"The {what} path must be text, not {type(path).__name__}.")
    path = require_input_file(path, f"{what[:1].upper()}{what[1:]}")
    named = f"{what} '{shown(path)}'"
    data_file = check_detached_data(path, data_root, f"{what[:1].upper()}{what[1:]}")
    if data_file is not None and not detached:
        raise FemurSegError(f"{named} takes its voxels from another file ('{shown(data_file)}'); send one file that "
                            "holds them (.nrrd, .nii.gz or .mha).")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        _check_complete(path, named)  # a file cut inside its header: say "truncated", not "unknown format"
        raise FemurSegError(
            f"{named} could not be read as an image (NRRD, NIfTI or MHA expected): "
            f"{_last_line(error, 'unknown reader error')}"
        ) from None
    _check_layout(reader.GetDimension(), reader.GetNumberOfComponents(), reader.GetSize(), named)
    _check_direction(reader.GetDirection(), named)
    if header_check is not None:
        header_check(reader.GetSize(), reader.GetSpacing())
    _check_complete(path, named)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        detail = _last_line(error, "")  # e.g. NRRD's "fread got only 29926 2-sized things, not 60000"
        detail = f" ({detail})" if detail and not detail.startswith("Reason:") else ""
        raise FemurSegError(
            f"{named} is truncated or damaged: its header reads but its voxel data does not{detail}; copy or export "
            "the file again."
        ) from None
    check_volume(image, named)
    return image


def read_ct(path: str | os.PathLike, what: str = "CT", data_root: Path | None = None,
            detached: bool = True, header_check: HeaderCheck | None = None) -> sitk.Image:
    """Read a CT and refuse what cannot be segmented (see check_ct; the options as for read_image)."""
    image = read_image(path, what, data_root, detached, header_check)
    check_ct(image, f"{what} '{path}'")
    return image


def read_label(path: str | os.PathLike, what: str = "label", data_root: Path | None = None,
               detached: bool = True) -> sitk.Image:
    """Read a label image and refuse what is not one (see check_label; data_root and detached as for read_image)."""
    image = read_image(path, what, data_root, detached)
    check_label(image, f"{what} '{path}'")
    return image


def _last_line(error: Exception, default: str) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1].strip() if lines else default


def _check_layout(dimension: int, components: int, size: tuple[int, ...], what: str) -> None:
    if components != 1:
        raise FemurSegError(
            f"{what} has {components} components per voxel; "
            "a single-channel CT volume is needed (convert colour or vector images to scalar first)."
        )
    if dimension != 3:
        raise FemurSegError(f"{what} is {dimension}D; FemurSeg needs a 3D volume.")
    if min(size) < 2:
        raise FemurSegError(f"{what} has size {list(size)}: it is a single slice or empty; a 3D volume is needed.")
    if math.prod(size) > MAX_VOXELS:
        raise FemurSegError(f"{what} has {math.prod(size):,} voxels, more than FemurSeg handles ({MAX_VOXELS:,}); "
                            "crop or resample it first.")


def _check_direction(direction: tuple[float, ...], what: str) -> None:
    """Refuse zero or collinear axis directions: the voxels would have no place in space."""
    matrix = np.array(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-6:
        raise FemurSegError(f"{what} has a degenerate direction matrix (zero or parallel axes: "
                            f"{', '.join(f'{v:g}' for v in direction)}); fix its header's space directions.")


def _check_complete(path: Path, what: str) -> None:
    """Refuse a NIfTI or MetaImage file that holds fewer voxel bytes than its header declares."""
    suffix = image_suffix(path)
    try:
        if suffix in (".nii", ".nii.gz"):
            with (gzip.open(path, "rb") if suffix == ".nii.gz" else open(path, "rb")) as handle:
                header = handle.read(540)
                declared, actual = _nifti_declared_bytes(header), len(header) + _stream_length(handle)
        elif suffix in (".mha", ".mhd"):
            declared, actual = _metaimage_declared_and_actual(path)
        else:
            return
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise FemurSegError(f"{what} is truncated or damaged: its compressed data ends early or is corrupt ({error}); "
                            "copy or export the file again.") from None
    if declared is not None and actual < declared:
        raise FemurSegError(f"{what} is truncated: its header declares {declared:,} bytes but the file holds "
                            f"{actual:,}; copy or export the file again.")


def _stream_length(handle, decompressor=None) -> int:
    """Bytes left in ``handle``, decompressed when given a zlib decompressor (EOFError if its stream ends early)."""
    length = 0
    for block in iter(lambda: handle.read(1 << 22), b""):
        length += len(decompressor.decompress(block)) if decompressor else len(block)
    if decompressor is not None and not decompressor.eof:
        raise EOFError("the compressed stream ends before its end marker")
    return length


_META_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                    "MET_DOUBLE": 8}


def _metaimage_declared_and_actual(path: Path) -> tuple[int | None, int]:
    """Voxel bytes a MetaImage header declares and the bytes its data holds (None: a layout not checked here)."""
    fields: dict[str, str] = {}
    with open(path, "rb") as handle:
        for line in iter(handle.readline, b""):
            key, _, value = line.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile" or len(fields) > 200:
                break
        data_file = fields.get("ElementDataFile", "")
        try:
            declared = math.prod(int(v) for v in fields["DimSize"].split()) \
                * int(fields.get("ElementNumberOfChannels", "1")) * _META_TYPE_BYTES[fields["ElementType"]]
        except (KeyError, ValueError):
            return None, 0
        compressed = fields.get("CompressedData", "False").lower() in ("true", "1")
        if data_file == "LOCAL":
            return declared, _stream_length(handle, zlib.decompressobj() if compressed else None)
    if data_file in ("", "LIST") or "%" in data_file or fields.get("HeaderSize", "0") not in ("0", ""):
        return None, 0
    data_path = Path(data_file) if Path(data_file).is_absolute() else path.parent / data_file
    if not data_path.is_file():  # read_image checked it with iopolicy.check_detached_data first
        return declared, 0
    with open(data_path, "rb") as handle:
        return declared, _stream_length(handle, zlib.decompressobj() if compressed else None)


def _nifti_declared_bytes(header: bytes) -> int | None:
    """Header plus voxel bytes of a single-file NIfTI-1 or NIfTI-2 header; None if it cannot tell."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bits = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            bits = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bits <= 0 or any(d < 1 for d in dims[1:dims[0] + 1]):
        return None
    return max(offset, 348) + math.prod(dims[1:dims[0] + 1]) * bits // 8


def check_volume(image: sitk.Image, what: str) -> None:
    """Refuse images that are not 3D, single-component and non-empty."""
    _check_layout(image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetSize(), what)


def check_ct(image: sitk.Image, what: str) -> None:
    """Refuse a CT that cannot hold a femur or would give garbage: tiny, absurd spacing, NaN/inf, or blank."""
    check_volume(image, what)
    size, spacing = image.GetSize(), image.GetSpacing()
    if min(size) < MIN_CT_SIZE:
        raise FemurSegError(f"{what} has size {list(size)}: too small to hold a femur (at least {MIN_CT_SIZE} "
                            "voxels along each axis).")
    low, high = CT_SPACING_MM
    if not all(low <= s <= high for s in spacing):
        shown = ", ".join(f"{s:g}" for s in spacing)
        raise FemurSegError(f"{what} has voxel spacing ({shown}) mm, outside {low:g}-{high:g} mm; fix the header "
                            "(metres or micrometres instead of millimetres?).")
    voxels = sitk.GetArrayViewFromImage(image)
    if voxels.dtype.kind == "f":
        bad = voxels.size - int(np.count_nonzero(np.isfinite(voxels)))
        if bad:
            raise FemurSegError(f"{what} has {bad:,} NaN or infinite voxels (of {voxels.size:,}); replace them "
                                "(e.g. with -1024 HU) first.")
    if voxels.min() == voxels.max():
        raise FemurSegError(f"{what} holds the same value ({voxels.flat[0]:g}) in every voxel: it is blank, there "
                            "is nothing to segment.")


def check_label(image: sitk.Image, what: str) -> None:
    """Refuse an image that is not a label: labels hold 0 and small non-negative integers, a CT does not."""
    check_volume(image, what)
    voxels = sitk.GetArrayViewFromImage(image)
    if voxels.dtype.kind == "f" and not (np.isfinite(voxels).all() and np.array_equal(voxels, np.round(voxels))):
        raise FemurSegError(f"{what} holds fractional or NaN values; a label holds whole numbers (0 = background).")
    low, high = voxels.min(), voxels.max()
    if low < 0 or high > 255:
        raise FemurSegError(f"{what} holds values from {low:g} to {high:g}; a label holds 0 (background) and values "
                            "1-255, so this looks like a CT or another image, not a label.")


def check_output_path(path: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = (),
                      suffixes: tuple[str, ...] | None = OUTPUT_SUFFIXES, what: str = "Output",
                      input_folders: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse an output path before any work (iopolicy.check_output_file: an input, a folder, a missing or
    read-only folder) and, for images, a format that is not one 3D volume file. Returns the path."""
    path = check_against_inputs(path, inputs, input_folders, what)
    if suffixes is not None and image_suffix(path) not in suffixes:
        raise FemurSegError(f"{what} '{path}' must end in {', '.join(suffixes)}: other formats (e.g. .png) cannot "
                            "hold a 3D label.")
    return check_output_file(path, what=what)  # the inputs were checked above


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    """True when both images have the same size, spacing, origin and direction."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)
    )


def describe_grid(image: sitk.Image) -> str:
    """Size, spacing and origin in one phrase, for messages about mismatched grids."""
    spacing = ", ".join(f"{s:g}" for s in image.GetSpacing())
    origin = ", ".join(f"{o:g}" for o in image.GetOrigin())
    return f"size {list(image.GetSize())}, spacing ({spacing}) mm, origin ({origin})"


def require_same_grid(reference: sitk.Image, other: sitk.Image, reference_name: str, other_name: str) -> None:
    """Refuse two images that are not voxel for voxel on one grid (comparing them would be meaningless)."""
    if not same_grid(reference, other):
        raise FemurSegError(
            f"{other_name} is not on the same voxel grid as {reference_name}: "
            f"{describe_grid(other)} vs {describe_grid(reference)}. Resample it onto the grid of {reference_name} "
            "first."
        )


def mask_array(image: sitk.Image) -> np.ndarray:
    """Boolean array (z, y, x) of the voxels with a non-zero label."""
    return sitk.GetArrayViewFromImage(image) != 0


def label_image_like(mask: np.ndarray, reference: sitk.Image, value: int = 1) -> sitk.Image:
    """A uint8 label image on ``reference``'s grid from a boolean (z, y, x) array."""
    label = sitk.GetImageFromArray(mask.astype(np.uint8) * np.uint8(value))
    label.CopyInformation(reference)
    return label


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write ``image`` atomically; the file appears under ``path`` complete or not at all."""
    with atomic_path(path) as temporary:
        try:
            sitk.WriteImage(image, str(temporary), compress)
        except RuntimeError as error:  # e.g. "_nrrdGzClose: failed to flush pending data" for a full disk
            message = str(error).strip().splitlines()[-1] if str(error).strip() else "write failed"
            raise FemurSegError(f"Could not write '{shown(path)}': "
                                f"{disk_full_message(Path(path)) or message}.") from None
