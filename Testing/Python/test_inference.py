"""The inference engine against nnU-Net's own predictor, with progress, cancel, orientation and devices.

The bundled model finds the femurs with its 3 mm locator first; the network stage itself is checked against
nnU-Net's predictor on a copy of the model without the locator (then FemurSeg runs it over the whole volume).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from FemurSegLib.demo import SAMPLE_CT, SAMPLE_LABEL
from FemurSegLib.errors import FemurSegError
from FemurSegLib.inference import InferenceCancelled, InferenceOptions, Segmenter, largest_component, resolve_device
from FemurSegLib.metrics import compare_images
from FemurSegLib.models import resolve_model


@pytest.fixture(scope="module")
def model():
    return resolve_model(None)


@pytest.fixture(scope="module")
def one_network(model, tmp_path_factory) -> Path:
    """The bundled model's 1 mm network alone, as an nnU-Net model folder from elsewhere would come."""
    root = tmp_path_factory.mktemp("one-network")
    dataset = model.trained_folder.parent
    shutil.copytree(dataset, root / dataset.name, ignore=shutil.ignore_patterns(*(
        p.name for p in dataset.iterdir() if p != model.trained_folder)))
    return root


@pytest.fixture(scope="module")
def segmenter(model):
    return Segmenter(model.root, InferenceOptions(device="cpu"), notify=lambda message: None)


@pytest.fixture(scope="module")
def sample():
    return sitk.ReadImage(str(SAMPLE_CT)), sitk.ReadImage(str(SAMPLE_LABEL))


@pytest.fixture(scope="module")
def sample_result(segmenter, sample):
    events: list[tuple[float, str]] = []
    label = segmenter.segment(sample[0], progress=lambda fraction, stage: events.append((fraction, stage)))
    return label, events


def test_segmentation_is_on_the_input_grid_and_accurate(sample, sample_result):
    ct, truth = sample
    label, _ = sample_result
    assert label.GetSize() == ct.GetSize() and label.GetSpacing() == ct.GetSpacing()
    assert label.GetOrigin() == ct.GetOrigin() and label.GetDirection() == ct.GetDirection()
    assert label.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(label))) <= {0, 1}
    assert compare_images(truth, label).dice > 0.95


def test_progress_rises_from_zero_to_one(sample_result):
    _, events = sample_result
    fractions = [fraction for fraction, _ in events]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(later >= earlier for earlier, later in zip(fractions, fractions[1:]))
    assert {"preparing", "predicting", "done"} <= {stage for _, stage in events}
    assert len(events) > 5, "progress moves during prediction, not only at the ends"


def _stock_prediction(model, ct: sitk.Image, tile_step_size: float, patch_size: list[int] | None = None):
    """nnU-Net's own predictor, no mirroring, plus the largest component (what FemurSeg's engine must equal)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_mirroring=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model.trained_folder), use_folds=model.folds)
    if patch_size is not None:
        predictor.configuration_manager.configuration["patch_size"] = patch_size
    array = sitk.GetArrayFromImage(ct).astype(np.float32)[None]
    stock = predictor.predict_single_npy_array(array, {"spacing": list(reversed(ct.GetSpacing()))})
    return largest_component(np.asarray(stock) == model.femur_label)


def test_default_engine_equals_nnunets_own_predictor(one_network, sample):
    """The network stage (fewest tiles, no mirroring, float32 as nnU-Net computes on a CPU, the network's own edge)
    is exactly nnU-Net's predictor at step 1.0 plus the largest component."""
    ct, _ = sample
    model = resolve_model(str(one_network))
    assert model.locator_folder is None
    label = Segmenter(one_network, InferenceOptions(device="cpu", bfloat16=False, half_maximum_edges=False),
                      notify=lambda message: None).segment(ct)
    # FemurSeg keeps up to two femur-sized pieces (a bilateral CT); the femur is the largest in both.
    femur = largest_component(sitk.GetArrayFromImage(label) != 0)
    assert np.array_equal(femur, _stock_prediction(model, ct, tile_step_size=1.0))


def test_located_result_agrees_with_the_whole_volume_network(one_network, sample, sample_result):
    """Locating first changes where the network looks, not what it finds: the two agree to Dice 0.98."""
    ct, _ = sample
    whole = Segmenter(one_network, InferenceOptions(device="cpu"), notify=lambda message: None).segment(ct)
    assert compare_images(whole, sample_result[0]).dice > 0.98


def test_whole_volume_tile_is_one_nnunet_patch_over_the_padded_volume(one_network, sample):
    """Whole-volume mode = nnU-Net's predictor with the patch raised to the volume rounded up to 16 (the network's
    total stride), so the sliding window makes a single step."""
    ct, _ = sample
    model = resolve_model(str(one_network))
    whole = Segmenter(one_network, InferenceOptions(device="cpu", whole_volume_tile=True, bfloat16=False,
                                                    half_maximum_edges=False), notify=lambda m: None)
    padded = [int(np.ceil(n / 16) * 16) for n in sitk.GetArrayViewFromImage(ct).shape]
    expected = _stock_prediction(model, ct, tile_step_size=0.5, patch_size=padded)
    assert np.array_equal(largest_component(sitk.GetArrayFromImage(whole.segment(ct)) != 0), expected)


def test_bfloat16_runs_where_the_cpu_has_it_and_agrees_with_float32(model, segmenter, sample, sample_result):
    """The default engine's convolutions compute in bfloat16 exactly when the CPU has native bfloat16, and the
    label then matches the float32 engine's to Dice 0.995 (held-out benchmark: Dice within 0.0001)."""
    import torch

    from FemurSegLib.precision import bfloat16_forward, native_bfloat16

    ct, _ = sample
    output_types: list[torch.dtype] = []
    first_convolution = segmenter.network.conv_modules[0]
    handle = first_convolution.register_forward_hook(lambda module, inputs, output: output_types.append(output.dtype))
    try:
        segmenter.segment(ct)
    finally:
        handle.remove()
    assert set(output_types) == {torch.bfloat16 if native_bfloat16() else torch.float32}
    float32 = Segmenter(model.root, InferenceOptions(device="cpu", bfloat16=False), notify=lambda m: None).segment(ct)
    assert compare_images(float32, sample_result[0]).dice > 0.995
    for device, enabled in ((torch.device("cpu"), False), (torch.device("cuda"), True), ("mps", True)):
        assert not bfloat16_forward(torch.nn.Identity(), device, enabled), (device, enabled)


def test_bfloat16_forward_returns_float32_outputs_close_to_float32():
    """Deep-supervision outputs (a list) come back as float32 and within bfloat16's precision of the float32 pass;
    the state dict is untouched."""
    import torch

    from FemurSegLib.precision import bfloat16_forward, native_bfloat16

    if not native_bfloat16():
        pytest.skip("this CPU has no native bfloat16; float32 is kept (checked in the engine test)")
    torch.manual_seed(0)
    convolution = torch.nn.Conv3d(1, 4, 3)

    class TwoLevels(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convolution = convolution

        def forward(self, x):
            y = self.convolution(x)
            return [y, y[:, :, ::2, ::2, ::2]]

    network, x = TwoLevels(), torch.randn(1, 1, 12, 12, 12)
    expected = network(x)
    keys = list(network.state_dict())
    assert bfloat16_forward(network, torch.device("cpu"))
    got = network(x)
    assert isinstance(got, list) and [g.dtype for g in got] == [torch.float32, torch.float32]
    for g, e in zip(got, expected):
        assert not torch.equal(g, e) and torch.allclose(g, e, atol=0.05, rtol=0.02)
    assert list(network.state_dict()) == keys


def test_half_maximum_edges_in_water_only_remove_face_exposed_voxels_and_help(model, sample, sample_result):
    """The sample stands in water, so the default label is the network's (``half_maximum_edges=False``) less some of
    its outermost voxels (edges.py adds only in air), and it is at least as close to the sample's exact truth."""
    from scipy import ndimage

    ct, truth = sample
    untrimmed = Segmenter(model.root, InferenceOptions(device="cpu", half_maximum_edges=False),
                          notify=lambda m: None).segment(ct)
    network_mask = sitk.GetArrayFromImage(untrimmed) != 0
    trimmed_mask = sitk.GetArrayFromImage(sample_result[0]) != 0
    removed = network_mask & ~trimmed_mask
    assert not (trimmed_mask & ~network_mask).any() and removed.any()
    assert not (removed & ndimage.binary_erosion(network_mask)).any(), "only the outer layer is judged"
    assert compare_images(truth, sample_result[0]).dice >= compare_images(truth, untrimmed).dice


@pytest.mark.parametrize("step", [0.0, -0.5, 1.5, 0.05])
def test_tile_step_outside_its_floor_to_one_is_refused_before_loading(model, step):
    with pytest.raises(FemurSegError, match=r"Tile step .* out of range.*\[0\.1, 1\]"):
        Segmenter(model.root, InferenceOptions(device="cpu", tile_step_size=step), notify=lambda m: None)


def test_any_orientation_gives_the_same_voxels(segmenter, sample, sample_result):
    ct, _ = sample
    flipped = sitk.DICOMOrient(ct, "RAI")  # x and y axes reversed: same anatomy, another voxel order
    assert flipped.GetDirection() != ct.GetDirection()
    label = segmenter.segment(flipped)
    assert label.GetDirection() == flipped.GetDirection() and label.GetOrigin() == flipped.GetOrigin()
    back = sitk.DICOMOrient(label, "LPS")
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(sample_result[0]))


def test_cancel_mid_inference_returns_promptly_and_gives_nothing(segmenter, sample):
    ct, _ = sample
    cancel = threading.Event()
    cancelled_at: list[float] = []

    def progress(fraction: float, stage: str) -> None:
        if stage == "predicting" and fraction > 0.1 and not cancel.is_set():
            cancelled_at.append(time.perf_counter())
            cancel.set()

    with pytest.raises(InferenceCancelled):
        segmenter.segment(ct, progress=progress, cancel=cancel)
    assert cancelled_at and time.perf_counter() - cancelled_at[0] < 2.0


def test_cancel_from_another_thread(segmenter, sample):
    """A GUI thread sets the event while the worker predicts; the worker stops within 2 s of that moment."""
    ct, _ = sample
    cancel, predicting = threading.Event(), threading.Event()
    cancelled_at: list[float] = []

    def cancel_when_predicting() -> None:
        predicting.wait(timeout=120)
        cancelled_at.append(time.perf_counter())
        cancel.set()

    canceller = threading.Thread(target=cancel_when_predicting)
    canceller.start()
    with pytest.raises(InferenceCancelled):
        segmenter.segment(ct, cancel=cancel,
                          progress=lambda fraction, stage: predicting.set() if fraction > 0.1 else None)
    canceller.join()
    assert time.perf_counter() - cancelled_at[0] < 2.0


def test_auto_device_falls_back_to_cpu_with_a_message():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the CPU fallback is not exercised")
    messages: list[str] = []
    assert resolve_device("auto", messages.append).type == "cpu"
    assert messages and "No GPU" in messages[0]


def test_missing_or_unknown_devices_are_refused():
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(FemurSegError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(FemurSegError, match="Unknown device"):
        resolve_device("tpu")


def test_two_dimensional_input_is_refused(segmenter):
    with pytest.raises(FemurSegError, match="2D"):
        segmenter.segment(sitk.Image(30, 30, sitk.sitkInt16))


def test_what_hangs_on_a_femur_by_a_thin_bridge_is_cut_off():
    """Analytic shapes at 0.8 x 0.8 x 1.2 mm: a 20 mm ball (the femur) with a 10 mm ball 35 mm away, joined by a
    rod. A 3 mm rod is a bridge (cut off with the small ball); a 14 mm one is part of the body (kept)."""
    from FemurSegLib.inference import solid_femur

    spacing = np.array([1.2, 0.8, 0.8])
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip((60, 120, 90), spacing)), indexing="ij")
    femur = (z - 36) ** 2 + (y - 30) ** 2 + (x - 36) ** 2 <= 20**2
    other = (z - 36) ** 2 + (y - 65) ** 2 + (x - 36) ** 2 <= 10**2
    for rod_radius, cut in ((1.5, True), (7.0, False)):
        rod = ((z - 36) ** 2 + (x - 36) ** 2 <= rod_radius**2) & (y > 30) & (y < 65)
        mask = femur | other | rod
        kept = solid_femur(mask, spacing)
        assert not np.any(kept & ~mask), "nothing is added"
        if cut:
            assert not np.any(kept & other), "the small ball hangs by a 3 mm rod: cut off"
            assert np.all(kept[femur]), "the femur itself is whole"
            assert np.count_nonzero(kept & rod & ~femur) * spacing.prod() < 60.0  # at most a 6 mm stub of the rod
        else:
            assert np.array_equal(kept, mask), "a 14 mm neck is part of one solid body"
    assert np.array_equal(solid_femur(femur, spacing), femur)


@pytest.mark.parametrize("view", ["spine", "legs"])
def test_a_ct_without_a_femur_gives_no_femur_and_says_why(segmenter, view):
    """Held-out clinical renders of the lumbar spine with sacrum, hip bones, ribs and organs, and of the lower legs
    (tibia, fibula): the exact label is empty, so every femur reported would be wrong."""
    from FemurSegLib.inference import NO_FEMUR
    from FemurSegLib.synthetic.cases import generate_case

    ct, truth, info = generate_case("clinical", 2, held_out=True, view=view)
    assert not sitk.GetArrayViewFromImage(truth).any() and info.sides == ()
    result = segmenter.run(ct)
    assert result.femurs == ()
    assert not sitk.GetArrayViewFromImage(result.label).any()
    assert NO_FEMUR in result.warnings


def test_a_clinical_ct_with_both_femurs_and_the_spine_labels_only_the_femurs(segmenter):
    """A held-out abdomen-pelvis render (spine, sacrum, organs, femurs cut below the heads): both femurs, each on
    its own side, and nothing labelled away from the true femurs."""
    from FemurSegLib.metrics import dice
    from FemurSegLib.synthetic.cases import generate_case

    ct, truth, info = generate_case("clinical", 3, held_out=True, view="abdomen")
    assert set(info.sides) == {"left", "right"}
    result = segmenter.run(ct)
    label = sitk.GetArrayFromImage(result.label)
    true_mask = sitk.GetArrayViewFromImage(truth) != 0
    assert {f.side for f in result.femurs} == {"left", "right"}
    assert dice(label != 0, true_mask) >= 0.9
    far = ndimage.distance_transform_edt(~true_mask, sampling=truth.GetSpacing()[::-1]) > 10.0
    assert not (far & (label != 0)).any()
