"""``femurseg web`` in a real headless Chromium: the whole job a user does in the page, and its refusals.

The server runs as a user starts it (``python -m FemurSegLib web``) with the real Slicer libraries rendering
through EGL; Selenium drives /usr/bin/chromium with real mouse and keyboard input. Every wait is bounded and
the server's process group is always killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FemurSegLib.errors import FemurSegError
from FemurSegLib.models import DEFAULT_MODEL
from FemurSegLib.web.safety import dataset_dir_inside, resolve_inside, validated_upload

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "Testing" / "artifacts"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--window-size=1600,1000")
MAX_UPLOAD_MB = 1


# --- the checks on what the browser sends, without a browser -------------------------------------------------

def test_dataset_folder_stays_inside_root(tmp_path):
    root = tmp_path / "datasets"
    root.mkdir()
    assert dataset_dir_inside(root, "Dataset101_FemurCorrected") == root.resolve() / "Dataset101_FemurCorrected"
    for bad in ("../Dataset101_X", "/tmp/Dataset101_X", "Dataset101_X/../../etc", "", "notadataset"):
        with pytest.raises(FemurSegError):
            dataset_dir_inside(root, bad)
    (tmp_path / "elsewhere").mkdir()
    (root / "Dataset102_Link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FemurSegError, match="outside"):
        dataset_dir_inside(root, "Dataset102_Link")


def test_paths_and_uploads_are_checked(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ct.nrrd").write_bytes(b"x")
    (root / "out").symlink_to("/etc/passwd")
    assert resolve_inside("ct.nrrd", [root], "CT") == (root / "ct.nrrd").resolve()
    for bad in ("/etc/passwd", "../root/../../etc/passwd", "out", "missing.nrrd"):
        with pytest.raises(FemurSegError):
            resolve_inside(bad, [root], "CT")
    with pytest.raises(FemurSegError, match="limited"):
        validated_upload("big.nrrd", b"0" * 2048, 1024, tmp_path, "ct")
    with pytest.raises(FemurSegError, match="could not be read") as refused:
        validated_upload("notes.nrrd", b"just text", 1024, tmp_path, "ct")
    assert str(tmp_path) not in str(refused.value)
    flat = sitk.Image(8, 8, sitk.sitkInt16)
    sitk.WriteImage(flat, str(tmp_path / "flat.nrrd"))
    with pytest.raises(FemurSegError, match="2D"):
        validated_upload("flat.nrrd", (tmp_path / "flat.nrrd").read_bytes(), 1 << 20, tmp_path, "ct")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.nrrd", "root"]  # refused uploads removed


# --- the page in Chromium --------------------------------------------------------------------------------------

def server_tracebacks(log_path: Path) -> list[str]:
    """The server log's tracebacks, except wslink's when a page's websocket closed under a message it was sending
    (a browser session ending; nothing of FemurSeg's)."""
    blocks = log_path.read_text().split("Traceback (most recent call last):")[1:]
    return [block for block in blocks
            if not ("wslink" in block and "closing transport" in block and "FemurSegLib" not in block)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.25) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def web_server(tmp_path_factory) -> Iterator[tuple[str, Path, Path]]:
    """A running ``femurseg web`` on a free loopback port: (url, datasets root, log file)."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)")
    (ARTIFACTS / "web_failure.png").unlink(missing_ok=True)  # only a failure of this run may leave one
    base = tmp_path_factory.mktemp("web")
    datasets_root, log_path = base / "datasets", base / "server.log"
    port = _free_port()
    (base / "tmp").mkdir()  # the server's temporary files: SIGKILL leaves them, pytest's tmp rotation removes them
    env = dict(os.environ, VTK_DEFAULT_OPENGL_WINDOW="vtkEGLRenderWindow", PYTHONPATH=str(REPO),
               FEMURSEG_WEB_MAX_UPLOAD_MB=str(MAX_UPLOAD_MB), TMPDIR=str(base / "tmp"),
               FEMURSEG_MODELS_DIR=str(base / "models"))  # fine-tuned models go here, not into the user's folder
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "FemurSegLib", "web", "--port", str(port), "--datasets-root", str(datasets_root)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        _wait(answers, 90, "the server to answer")
        yield url, datasets_root, log_path
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(web_server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never go online; the driver is given
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.TemporaryDirectory(prefix="femurseg-chromium-")
    options.add_argument(f"--user-data-dir={profile.name}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        profile.cleanup()


class Page:
    """The FemurSeg page, driven through the ``fs-*`` ids the panel gives its widgets."""

    def __init__(self, driver, url: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver, self.by = driver, By
        driver.get(url)
        # The server keeps the page's state across loads: an earlier test may have left the other tab open.
        _wait(lambda: driver.find_elements(By.ID, "fs-tab-femurseg"), 60, "the FemurSeg tab")
        driver.find_element(By.ID, "fs-tab-femurseg").click()
        _wait(lambda: any(e.is_displayed() for e in driver.find_elements(By.ID, "fs-load-sample")), 60,
              "the FemurSeg panel")
        time.sleep(0.5)  # the tab's slide transition: buttons that are still moving refuse clicks

    def element(self, element_id: str):
        return self.driver.find_element(self.by.ID, element_id)

    def click(self, element_id: str) -> None:
        self.element(element_id).click()

    def message(self) -> str:
        return self.driver.execute_script("return document.getElementById('fs-message')?.textContent ?? ''")

    def dismiss(self) -> None:
        """Close the message, so the next expect() sees only what the next action says."""
        self.driver.execute_script("document.querySelector('#fs-message .v-alert__close button')?.click()")
        _wait(lambda: not self.message(), 10, "the message to close")

    def expect(self, text: str, timeout_s: float = 30) -> str:
        """Wait for ``text`` in the page's message; on time-out keep a screenshot to see why."""
        try:
            return _wait(lambda: text in self.message() and self.message(), timeout_s, f"'{text}' in the page")
        except AssertionError:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            self.driver.save_screenshot(str(ARTIFACTS / "web_failure.png"))
            raise AssertionError(f"no '{text}' within {timeout_s:.0f} s; the page says '{self.message()}' "
                                 "(Testing/artifacts/web_failure.png)") from None

    def type(self, element_id: str, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        field = self.element(element_id)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.DELETE)
        field.send_keys(text)

    def upload(self, path: Path) -> None:
        self.element("fs-upload-ct").send_keys(str(path))

    def axial_view(self):
        """The largest view in the 'Axial Primary' layout is the axial slice view."""
        images = self.driver.find_elements(self.by.CSS_SELECTOR, "img.image-display-area")
        return max(images, key=lambda image: image.size["width"] * image.size["height"])

    def state(self, name: str):
        return self.driver.execute_script(f"return window.trame.state.get('{name}')")

    def choose(self, select_id: str, title: str) -> None:
        """Pick ``title`` in a VSelect with the mouse, as a user does."""
        self.element(select_id).find_element(self.by.XPATH, "./ancestor::div[contains(@class, 'v-field')]").click()
        item = _wait(lambda: [e for e in self.driver.find_elements(self.by.CSS_SELECTOR, ".v-overlay .v-list-item")
                              if e.is_displayed() and e.text.strip() == title], 10, f"'{title}' in the list")
        item[0].click()
        _wait(lambda: not [e for e in self.driver.find_elements(self.by.CSS_SELECTOR, ".v-overlay .v-list-item")
                           if e.is_displayed()], 10, "the list to close")

    def view_pixels(self) -> np.ndarray:
        """The views as the browser shows them, (rows, columns, RGB): the screenshot cut to the views' area."""
        from io import BytesIO

        from PIL import Image

        time.sleep(1.5)  # let the views stream their last frame
        box = self.driver.execute_script(
            "const r = [...document.querySelectorAll('img.image-display-area')].map(i => i.getBoundingClientRect());"
            "return [Math.min(...r.map(b => b.left)), Math.min(...r.map(b => b.top)),"
            " Math.max(...r.map(b => b.right)), Math.max(...r.map(b => b.bottom)), window.devicePixelRatio];")
        image = Image.open(BytesIO(self.driver.get_screenshot_as_png())).convert("RGB")
        scale = box[4]
        return np.asarray(image.crop(tuple(int(v * scale) for v in box[:4]))).astype(int)


def colour_pixels(pixels: np.ndarray, colour) -> int:
    """How many pixels show ``colour`` (0..1 RGB), within what JPEG streaming changes."""
    return int((np.abs(pixels - np.array(colour) * 255).max(axis=2) < 45).sum())


def _label_voxels(path: Path) -> int:
    return int(np.count_nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))))


def test_refusals_leave_the_server_up(web_server, browser, tmp_path):
    url, datasets_root, _ = web_server
    page = Page(browser, url)

    big = tmp_path / "big.nrrd"
    big.write_bytes(b"\0" * (MAX_UPLOAD_MB * 1024**2 + 1))
    page.upload(big)
    page.expect("uploads are limited to 1 MB")
    page.dismiss()

    junk = tmp_path / "notes.nrrd"
    junk.write_text("not an image\n")
    page.upload(junk)
    page.expect("could not be read as an image")
    assert "femurseg-web-" not in page.message()  # the server's temporary file is not shown
    page.dismiss()

    truncated = tmp_path / "cut.nii.gz"  # ITK would read the missing half as zeros
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(24**3, dtype=np.int16).reshape(24, 24, 24)), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    page.upload(truncated)
    page.expect("The uploaded CT 'cut.nii.gz' is truncated")
    page.dismiss()

    blank = tmp_path / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((24, 24, 24), np.nan, np.float32)), str(blank))
    page.upload(blank)
    page.expect("has 13,824 NaN or infinite voxels")
    page.dismiss()

    page.type("fs-path", "/etc/passwd")
    page.click("fs-open-path")
    page.expect("outside the folders this server may read")
    page.dismiss()

    page.click("fs-load-sample")  # the next request still works
    page.expect("Loaded FemurPhantom05.nrrd")
    page.type("fs-dataset", "../Dataset666_Escape")
    page.click("fs-export")
    page.expect("not a plain nnU-Net dataset name")
    page.dismiss()
    page.type("fs-ft-dataset", "../Dataset666_Escape")  # Improve the model: the same confinement, no child started
    page.click("fs-ft-start")
    page.expect("not a plain nnU-Net dataset name")
    page.dismiss()
    page.type("fs-ft-dataset", "Dataset103_Missing")
    page.click("fs-ft-start")
    page.expect("Dataset103_Missing' does not exist")
    assert not browser.find_elements(page.by.ID, "fs-ft-progress")
    assert not any(datasets_root.parent.glob("Dataset666*")) and not any(datasets_root.iterdir())


def test_segment_compare_paint_export(web_server, browser, artifacts_dir):
    from selenium.webdriver.common.action_chains import ActionChains

    url, datasets_root, log_path = web_server
    page = Page(browser, url)
    page.dismiss()
    page.type("fs-path", "")
    page.type("fs-dataset", "Dataset101_FemurCorrected")
    page.type("fs-case", "carried-over")
    page.click("fs-load-sample")
    page.expect("Loaded FemurPhantom05.nrrd")
    assert page.element("fs-case").get_attribute("value") == "FemurPhantom05"  # from the file, not the last CT's

    page.click("fs-segment")  # progress shows and Cancel stops the child
    _wait(lambda: browser.find_elements(page.by.ID, "fs-progress"), 20, "the progress bar")
    page.click("fs-cancel")
    page.expect("Segmentation cancelled")

    page.click("fs-compute-fill")
    page.expect("Fill computed")
    fill_only = page.view_pixels()
    page.click("fs-segment")
    page.expect("Compared with fill", timeout_s=120)
    assert "Found Femur" in page.message() and "reference: nnU-Net" in page.message()
    assert page.element("fs-comparison-title").text == "fill vs nnU-Net (reference: nnU-Net)"
    header = [cell.text for cell in page.element("fs-metrics").find_elements(page.by.CSS_SELECTOR, "th")]
    assert header[:2] == ["Femur", "Dice"] and "fill − nnU-Net ml" in header
    rows = page.state("fs_rows")
    assert [row[0] for row in rows] == ["Femur"]  # the phantom: one femur, side unknown
    dice, nn_ml, fill_ml, difference_ml = float(rows[0][1]), float(rows[0][4]), float(rows[0][5]), float(rows[0][6])
    assert 0.5 < dice <= 1.0 and difference_ml == pytest.approx(fill_ml - nn_ml, abs=0.11)
    assert all(len(cell.split(".")[1]) == 1 for cell in rows[0][4:8])  # ml and % to one decimal
    # After Compute fill and Segment, what Export writes is still nnU-Net's draft, and the page says what it holds.
    assert page.state("fs_export_target") == "draft:Femur (nnU-Net)"
    assert re.fullmatch(r"The label will hold Femur \(nnU-Net\) \d+\.\d ml\.", page.element("fs-export-preview").text)

    # The views show every draft in its own colour: nnU-Net and fill outlines, their disagreement filled.
    pixels = page.view_pixels()
    browser.save_screenshot(str(artifacts_dir / "web_after_segment.png"))
    from FemurSegLib import scene

    assert colour_pixels(pixels, scene.COLOR_NNUNET) > 50 and colour_pixels(pixels, scene.COLOR_FILL) > 20
    disagreement = colour_pixels(pixels, scene.COLOR_NNUNET_ONLY) + colour_pixels(pixels, scene.COLOR_FILL_ONLY)
    assert disagreement > 20
    assert colour_pixels(fill_only, scene.COLOR_FILL) > 20  # the fill alone: its outline
    assert colour_pixels(fill_only, scene.COLOR_NNUNET) < 5  # before Segment: no nnU-Net colour anywhere
    legend = page.element("fs-legend").text
    assert "nnU-Net, right femur (outline)" in legend and "fill only (filled)" in legend

    # Jump to the worst places: the list names them, a click shows one; the bone window darkens soft tissue.
    places = page.state("fs_worst_places")
    assert places and "ml disagree" in places[0]["title"]
    page.click("fs-jump-worst")
    page.expect(f"Showing {places[0]['title']}")
    page.dismiss()
    page.click("fs-window-bone")
    bone = page.view_pixels().mean()
    page.click("fs-window-soft")  # soft tissue (~40 HU) mid-grey instead of near black
    assert page.view_pixels().mean() > bone + 2

    # The draft as segmented, kept as a test case to compare the corrected label with.
    page.type("fs-case", "draft")
    browser.execute_script("document.getElementById('fs-split-test').click()")
    page.click("fs-export")
    page.expect("Exported the nnU-Net draft as case draft (test)")
    page.dismiss()

    # Paint one stroke with the mouse on the axial view, above the femur, into "Femur (nnU-Net)".
    paint = browser.find_elements(page.by.CSS_SELECTOR, "button .mdi-brush")
    paint[0].click()
    view = page.axial_view()
    height, width = view.size["height"], view.size["width"]
    stroke = ActionChains(browser, duration=50)
    stroke.move_to_element_with_offset(view, -int(0.2 * width), -int(0.1 * height)).click_and_hold()
    for _ in range(16):
        stroke.move_by_offset(int(0.4 * width / 16), 0)
    stroke.release().perform()
    _wait(lambda: browser.execute_script("return window.trame.state.get('SegmentEditorState__can_undo')"), 60,
          "the stroke to reach the segmentation (Undo enabled)")
    _wait(lambda: page.state("fs_rows") != rows, 60, "the table to be recomputed after the stroke")
    assert float(page.state("fs_rows")[0][4]) > nn_ml  # the stroke added to nnU-Net's draft

    page.type("fs-case", "case001")
    browser.execute_script("document.getElementById('fs-split-train').click()")
    page.click("fs-export")
    confirmation = page.expect("Exported the nnU-Net draft as case case001 (train)", timeout_s=60)
    assert "numTraining 1" in confirmation
    page.dismiss()
    page.click("fs-export")  # again: refused with this page's advice, then replaced once Replace is ticked
    refused = page.expect("already exists")
    assert "tick Replace" in refused and "--replace" not in refused
    page.dismiss()
    page.click("fs-replace")
    page.click("fs-export")
    page.expect("(the old files are in femurseg/replaced/)", timeout_s=60)
    page.click("fs-replace")
    browser.save_screenshot(str(artifacts_dir / "web_after_export.png"))
    page.click("fs-tab-editor")  # the rest of Slicer's Segment Editor: islands, threshold, ...
    for icon in ("mdi-scatter-plot", "mdi-auto-fix", "mdi-eraser"):
        _wait(lambda icon=icon: browser.find_elements(page.by.CSS_SELECTOR, f".v-window-item--active .{icon}"), 10,
              icon)

    dataset = datasets_root / "Dataset101_FemurCorrected"
    info = json.loads((dataset / "dataset.json").read_text())
    assert info["numTraining"] == 1
    image, label = dataset / "imagesTr" / "case001_0000.nii.gz", dataset / "labelsTr" / "case001.nii.gz"
    assert image.is_file() and label.is_file()
    draft = dataset / "labelsTs" / "draft.nii.gz"
    painted = _label_voxels(label) - _label_voxels(draft)
    assert painted > 20, f"the stroke added {painted} voxels to the label"
    assert sitk.ReadImage(str(image)).GetSize() == sitk.ReadImage(str(label)).GetSize()
    log = log_path.read_text()  # one line per user action, with what it acted on
    assert "action: Export Dataset101_FemurCorrected/case001 (train) draft:Femur (nnU-Net) replace=True" in log
    assert "action: Jump to worst slice" in log and "action: Window bone" in log
    assert not server_tracebacks(log_path)


def test_warm_segment_then_surface_export(web_server, browser):
    """The worker stays warm across Segments; the draft's surface goes to <datasets root>/Surfaces, closed and in
    the coordinates of the label the same segment exports to."""
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkIOGeometry import vtkSTLReader

    url, datasets_root, log_path = web_server
    page = Page(browser, url)
    page.click("fs-load-sample")
    page.expect("Loaded FemurPhantom05.nrrd")
    page.dismiss()
    page.click("fs-segment")
    page.expect("Found Femur", timeout_s=120)
    page.dismiss()
    page.type("fs-case", "../escape")
    page.click("fs-export-surface")
    page.expect("may only use letters")
    page.dismiss()
    page.type("fs-case", "surface01")
    page.click("fs-export-surface")
    page.expect("Saved the surface of the nnU-Net draft as Surfaces/surface01.stl: watertight", timeout_s=60)
    page.dismiss()
    written = (datasets_root / "Surfaces" / "surface01.stl").stat().st_mtime_ns
    page.click("fs-export-surface")  # the same rule as for dataset cases: refused unless Replace is ticked
    assert "tick Replace" in page.expect("Surface file 'surface01.stl' already exists")
    assert (datasets_root / "Surfaces" / "surface01.stl").stat().st_mtime_ns == written
    page.dismiss()
    page.type("fs-dataset", "Dataset102_SurfaceCheck")
    page.click("fs-export")
    page.expect("Exported the nnU-Net draft as case surface01", timeout_s=60)
    assert not list(datasets_root.glob("**/escape*"))

    label = sitk.ReadImage(str(datasets_root / "Dataset102_SurfaceCheck" / "labelsTr" / "surface01.nii.gz"))
    reader = vtkSTLReader()
    reader.SetFileName(str(datasets_root / "Surfaces" / "surface01.stl"))
    reader.Update()
    points = numpy_support.vtk_to_numpy(reader.GetOutput().GetPoints().GetData()).astype(float)
    triangles = numpy_support.vtk_to_numpy(reader.GetOutput().GetPolys().GetConnectivityArray()).reshape(-1, 3)
    edges = np.sort(np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]), axis=1)
    assert np.all(np.unique(edges, axis=0, return_counts=True)[1] == 2), "not watertight"
    a, b, c = (points[triangles[:, i]] for i in range(3))
    tetrahedra = np.einsum("ij,ij->i", a, np.cross(b, c)) / 6.0  # signed, with the origin: divergence theorem
    mask = sitk.GetArrayFromImage(label) != 0
    assert tetrahedra.sum() == pytest.approx(mask.sum() * np.prod(label.GetSpacing()), rel=0.01)
    solid_centroid = (tetrahedra[:, None] * (a + b + c) / 4).sum(axis=0) / tetrahedra.sum()
    centroid_index = np.argwhere(mask).mean(axis=0)[::-1]
    centroid_lps = np.array(label.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in centroid_index)))
    assert np.allclose(solid_centroid, centroid_lps, atol=0.5), "the surface is not where the label is (LPS)"
    assert not server_tracebacks(log_path)


def test_a_ct_without_a_femur_says_so_and_adds_nothing(web_server, browser, tmp_path):
    """The guard's words reach the page: a CT of soft tissue only gives "No femur found" and no segment."""
    url, _, _ = web_server
    page = Page(browser, url)
    page.dismiss()
    soft_tissue = sitk.GetImageFromArray(np.random.default_rng(5).normal(40, 15, (60, 80, 80)).astype(np.int16))
    path = tmp_path / "soft_tissue.nrrd"
    sitk.WriteImage(soft_tissue, str(path))
    page.upload(path)
    page.expect("Loaded soft_tissue.nrrd")
    page.dismiss()
    items_before = browser.execute_script("return document.body.innerText").count("(nnU-Net)")
    page.click("fs-segment")
    page.expect("No femur found", timeout_s=120)
    assert browser.execute_script("return document.body.innerText").count("(nnU-Net)") == items_before


def test_improve_the_model_then_segment_with_it(web_server, browser):
    """Export three cases, Start fine-tuning with a tiny budget, wait for the new model in the list, Segment with it."""
    url, datasets_root, log_path = web_server
    page = Page(browser, url)
    page.dismiss()
    page.type("fs-path", "")
    page.click("fs-load-sample")
    page.expect("Loaded FemurPhantom05.nrrd")
    page.click("fs-compute-fill")
    page.expect("Fill computed")
    page.dismiss()
    page.type("fs-dataset", "Dataset102_FemurImprove")
    page.click("fs-export")  # Compute fill did not make the fill what Export writes: that is the user's choice
    page.expect("There is no nnU-Net draft yet to export")
    page.dismiss()
    page.choose("fs-export-target", "fill draft")
    assert page.element("fs-export-preview").text.startswith("The label will hold Femur (fill) ")
    for case, split in (("site1", "train"), ("site2", "train"), ("site3", "test")):
        page.type("fs-case", case)
        browser.execute_script(f"document.getElementById('fs-split-{split}').click()")
        page.click("fs-export")
        page.expect(f"as case {case} ({split})")
        page.dismiss()
    assert page.element("fs-ft-dataset").get_attribute("value") == "Dataset102_FemurImprove"  # what Export wrote

    page.type("fs-ft-minutes", "0.1")  # the whole job's budget: training stops after its first iteration
    page.click("fs-ft-start")
    _wait(lambda: browser.find_elements(page.by.ID, "fs-ft-progress"), 20, "the fine-tuning progress bar")
    done = page.expect(f"New model {DEFAULT_MODEL}-FemurImprove installed and selected: Dice ", timeout_s=300)
    assert " -> " in done and "on 1 validation case(s)" in done
    assert (datasets_root.parent / "models" / f"{DEFAULT_MODEL}-FemurImprove" / "model_card.json").is_file()
    shown = browser.execute_script(  # the model choice now shows the new model with its figures
        "return document.getElementById('fs-model').closest('.v-select').innerText")
    assert f"{DEFAULT_MODEL}-FemurImprove: Dice " in shown, shown
    page.dismiss()

    page.click("fs-segment")
    page.expect(f"(model {DEFAULT_MODEL}-FemurImprove)", timeout_s=120)
    assert not server_tracebacks(log_path)
