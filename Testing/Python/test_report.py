"""The PNG figures: outlines lie exactly on each mask's edge, in the mask's colour, over the CT's bone window."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from PIL import Image

from FemurSegLib.report import CONTOUR_COLOURS, overlay_png, slice_picture


def colour_mask(picture: np.ndarray, name: str) -> np.ndarray:
    rgb = tuple(int(CONTOUR_COLOURS[name][i:i + 2], 16) for i in (1, 3, 5))
    return np.all(picture == rgb, axis=2)


def test_the_outline_is_the_masks_edge_by_simpleitk_enlarged_and_drawn_bottom_up():
    rows, columns = np.mgrid[:40, :50]
    disc = (rows - 14) ** 2 + (columns - 22) ** 2 <= 12 ** 2
    square = (rows >= 20) & (rows < 36) & (columns >= 30) & (columns < 46)
    picture = slice_picture(np.where(disc, 1600, -200), {"truth": disc, "fill": square}, zoom=3)
    assert picture.shape == (120, 150, 3)
    upright = picture[::-1]  # row 0 of the slice is drawn at the bottom
    for name, mask in (("truth", disc), ("fill", square)):
        big = np.kron(mask, np.ones((3, 3), dtype=bool))
        edge = sitk.GetArrayFromImage(sitk.BinaryContour(sitk.GetImageFromArray(big.astype(np.uint8)), False)) > 0
        drawn = colour_mask(upright, name)
        if name == "truth":  # drawn first: the square's outline covers it where they cross
            edge &= ~colour_mask(upright, "fill")
        assert np.array_equal(drawn, edge), name
    inside = np.kron(disc & ~square, np.ones((3, 3), dtype=bool))
    inside &= ~colour_mask(upright, "truth") & ~colour_mask(upright, "fill")
    assert (upright[inside] == 255).all(), "1600 HU is the top of the bone window"
    assert (upright[~np.kron(disc | square, np.ones((3, 3), dtype=bool))] == 0).all(), "-200 HU is its bottom"


def test_overlay_shows_the_slices_where_two_masks_differ_most(tmp_path):
    hu = np.full((30, 40, 50), -200, dtype=np.int16)
    truth = np.zeros(hu.shape, dtype=np.uint8)
    truth[5:25, 10:30, 10:40] = 1
    other = truth.copy()
    other[17, 10:30, 10:40] = 0  # the masks differ on one axial slice only
    images = {}
    for name, array in (("ct", hu), ("truth", truth), ("nnU-Net", other)):
        images[name] = sitk.GetImageFromArray(array)
    path = tmp_path / "overlay.png"
    indices = overlay_png(images["ct"], {"truth": images["truth"], "nnU-Net": images["nnU-Net"]}, path,
                          ("truth", "nnU-Net"), title="case")
    assert indices[0] == 17
    with Image.open(path) as png:
        picture = np.asarray(png.convert("RGB"))
    assert colour_mask(picture, "truth").any() and colour_mask(picture, "nnU-Net").any()
