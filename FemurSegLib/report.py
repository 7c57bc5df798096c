"""PNG figures for people: contour overlays where segmentations disagree most, and phantom montages.

Drawn with Pillow straight from the voxels (grey CT window, each mask's outline one pixel wide on the slice
enlarged by whole pixels), not with matplotlib: a batch draws one overlay per case, and matplotlib's figure
machinery cost 0.22 s of the 1.8 s a phantom takes there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .imageio import atomic_path
from .metrics import worst_slice

CONTOUR_COLOURS = {"truth": "#2ca02c", "nnU-Net": "#d62728", "fill": "#1f77b4", "threshold": "#ff7f0e"}
OTHER_COLOUR = "#ffffff"
HU_WINDOW = (-200.0, 1600.0)
PANEL_PIXELS = 420  # a slice is enlarged by whole pixels until its longer side nears this
TEXT_HEIGHT = 22


def _rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def _font(size: int = 14):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def slice_picture(hu: np.ndarray, outlines: dict[str, np.ndarray], zoom: int) -> np.ndarray:
    """RGB picture (uint8, rows x columns x 3) of one 2D CT slice in the bone window, enlarged ``zoom`` times, with
    the inner edge of each named 2D mask painted in its colour. Row 0 is drawn at the bottom, as the slice lies."""
    low, high = HU_WINDOW
    grey = np.clip((np.asarray(hu, dtype=np.float32) - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
    grey = grey.repeat(zoom, 0).repeat(zoom, 1)
    picture = np.repeat(grey[..., None], 3, axis=2)
    for name, mask in outlines.items():
        big = np.asarray(mask, dtype=bool).repeat(zoom, 0).repeat(zoom, 1)
        edge = big & ~ndimage.binary_erosion(big, border_value=0)
        picture[edge] = _rgb(CONTOUR_COLOURS.get(name, OTHER_COLOUR))
    return picture[::-1]


def _zoom(shapes: list[tuple[int, ...]]) -> int:
    return max(1, round(PANEL_PIXELS / max(max(shape) for shape in shapes)))


def _sheet(panels: list[tuple[np.ndarray, str]], columns: int, title: str | None, legend: list[str]):
    """Panels (picture, caption) on a black sheet in rows of ``columns``, a title above and a legend below."""
    from PIL import Image, ImageDraw

    gap = 8
    font = _font()
    width = max(max(picture.shape[1], int(font.getlength(caption))) for picture, caption in panels)
    height = max(picture.shape[0] for picture, _ in panels) + TEXT_HEIGHT
    rows = (len(panels) + columns - 1) // columns
    top = TEXT_HEIGHT if title else 0
    bottom = TEXT_HEIGHT if legend else 0
    sheet = Image.new("RGB", (columns * (width + gap) + gap, top + rows * (height + gap) + bottom), "black")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((gap, 3), title, fill="white", font=font)
    for number, (picture, caption) in enumerate(panels):
        x = gap + (number % columns) * (width + gap)
        y = top + (number // columns) * (height + gap)
        draw.text((x, y + 3), caption, fill="white", font=font)
        sheet.paste(Image.fromarray(picture), (x, y + TEXT_HEIGHT))
    x, y = gap, sheet.height - TEXT_HEIGHT + 3
    for name in legend:
        draw.line((x, y + 8, x + 20, y + 8), fill=CONTOUR_COLOURS.get(name, OTHER_COLOUR), width=3)
        draw.text((x + 26, y), name, fill="white", font=font)
        x += 40 + int(font.getlength(name))
    return sheet


def _save(sheet, path: Path) -> None:
    with atomic_path(path) as temporary:
        sheet.save(temporary, format="PNG")


def overlay_png(ct: sitk.Image, masks: dict[str, sitk.Image], path: Path, compare: tuple[str, str] | None = None,
                title: str | None = None) -> list[int]:
    """Contours of every mask on the axial, coronal and sagittal slices where ``compare`` disagree most.

    Without ``compare`` (one result, nothing to hold it against) the slices are where the first mask is largest.
    Returns the slice index per array axis (z, y, x).
    """
    hu = sitk.GetArrayViewFromImage(ct)
    arrays = {name: sitk.GetArrayViewFromImage(mask) != 0 for name, mask in masks.items()}
    first, second = (arrays[name] for name in compare) if compare else (next(iter(arrays.values())), None)
    if second is not None:
        indices = [worst_slice(first, second, axis) for axis in range(3)]
    else:
        indices = [int(np.argmax(first.sum(axis=tuple(a for a in range(3) if a != axis)))) if first.any()
                   else hu.shape[axis] // 2 for axis in range(3)]
    cuts = []
    for axis, index in enumerate(indices):
        cut = [slice(None)] * 3
        cut[axis] = index
        cuts.append(tuple(cut))
    zoom = _zoom([hu[cut].shape for cut in cuts])
    panels = []
    for axis, (index, cut) in enumerate(zip(indices, cuts)):
        caption = f"{'zyx'[axis]} = {index}"
        if second is not None:
            caption += f": {int(np.count_nonzero(first[cut] != second[cut]))} voxels differ"
        panels.append((slice_picture(hu[cut], {name: array[cut] for name, array in arrays.items()}, zoom), caption))
    heading = " - ".join(part for part in (title, compare and f"slices where {compare[0]} and {compare[1]} differ most")
                         if part)
    _save(_sheet(panels, 3, heading, list(arrays)), path)
    return indices


def montage_png(cases: list[tuple[str, sitk.Image, sitk.Image]], path: Path) -> None:
    """One coronal slice through the femoral neck per case, label contour in green."""
    pieces = []
    for name, ct, label in cases:
        mask = sitk.GetArrayViewFromImage(label) != 0
        index = int(np.argmax(mask.sum(axis=(0, 2))))  # the y slice with the most femur: through head and neck
        pieces.append((name, sitk.GetArrayViewFromImage(ct)[:, index, :], mask[:, index, :]))
    zoom = max(1, _zoom([hu.shape for _, hu, _ in pieces]) // 2)
    panels = [(slice_picture(hu, {"truth": mask}, zoom), name) for name, hu, mask in pieces]
    _save(_sheet(panels, 5, None, []), path)
