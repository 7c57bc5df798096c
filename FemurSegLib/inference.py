"""Run an nnU-Net v2 femur model on a CT, in process: locate, segment each femur, check, with progress and cancel.

The network work is nnU-Net's own (``nnUNetPredictor.predict_single_npy_array``: preprocessing, sliding window,
resampling back). FemurSeg adds, around it:

- **Locate first** (models with a locator configuration, like the bundled model): the CT is resampled to the
  locator's 3 mm grid (SimpleITK, linear), the locator marks femur voxels, and its large connected pieces that are
  bone are the candidates, the most femur-like first (femoral-head coverage, femur_shape.py), at most
  MAX_CANDIDATES. The 1 mm network then runs only on a box around each candidate (bounding box +
  ``ROI_MARGIN_MM``), resampled to 1 mm by cubic B-spline (nnU-Net resampled its training images with third-order
  splines); its probabilities are resampled back to the CT's own voxels and thresholded, and of each the largest
  piece is kept without
  what hangs on it by a bridge thinner than 6 mm (hip bone across the joint, ``solid_femur``). So an abdomen, an
  empty margin or the other hip never reaches the fine network, and a clinical-size CT costs little more than a
  cropped one. Models without a locator (nnU-Net folders from elsewhere) run on the whole volume as nnU-Net does.
- **Only femurs**: of the segmented candidates, a femur is one with a femoral head (femur_shape.py: a sphere of
  17-30 mm radius, or a hip replacement's metal head, that the bone follows over most of its surface, the neck
  leaving it on one side); a vertebra, the sacrum, the ilium, a tibia or a shaft without its head is left out, and
  said so. Borderline heads are kept with a warning; two femurs that are not a plausible pair are warned about.
- **Both femurs, with sides**: up to two femurs; with two, the one towards the patient's left (LPS +x) is
  left; a single femur's side comes from its head lying medial to its shaft (in-vivo frame), else it is
  reported as "femur". Label values: ``LABEL_VALUES`` (left 1, right 2).
- **Plausibility** (guard.py): the CT is checked before (does it look like HU?) and each femur after (volume,
  pieces, share of the field of view); the words come back as ``SegmentationResult.warnings``, and "no femur
  found" when there is none. Never a silent litre-sized "femur".
- **Edges from the CT**: of each femur's outermost voxel layer, what is darker than the local half maximum between
  cortex and surroundings is removed, and where the bone stands in air, what is brighter just outside it is added
  (edges.py); ``half_maximum_edges=False`` keeps the network's edge.
- **Fewest tiles** (default): nnU-Net's sliding window at ``tile_step_size=1.0`` without mirroring, in bfloat16 on
  a CPU that computes it natively (precision.py; ``bfloat16=False`` keeps float32).
- **Progress and cancel**: a forward pre-hook on every convolution reports progress and raises
  :class:`InferenceCancelled` as soon as the cancel event is set.
- **Geometry**: the CT is reoriented to LPS for the networks; the label is returned on the input's exact grid.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .budget import check_network_input, check_tile_step
from .edges import fit_edges_to_half_maximum
from .errors import FemurSegError
from .femur_shape import HeadFit, fit_femoral_head
from .fill import largest_component
from .guard import check_femur, ct_warnings
from .imageio import check_ct
from .precision import bfloat16_forward

ProgressCallback = Callable[[float, str], None]

DEVICES = ("auto", "cpu", "cuda", "mps")
SIDES = ("both", "left", "right")
LABEL_VALUES = {"left": 1, "right": 2}  # a single femur whose side cannot be told is written as 1 ("femur")
ROI_MARGIN_MM = 15.0
MIN_FEMUR_ML = 15.0  # smaller located pieces are not femurs (a femoral head alone is ~25 ml)
MIN_FEMUR_MEAN_HU = 100.0  # a piece that is on average water, fat or air inside is not bone (femurs: 250-800 HU)
BRIDGE_RADIUS_MM = 3.0  # what hangs on a femur by a bridge thinner than twice this is cut off (solid_femur)
NO_FEMUR = "no femur found"
MAX_CANDIDATES = 4  # located pieces, the most femur-like first, that the 1 mm network segments
PAIR_DISTANCE_MM = (120.0, 260.0)  # between the two femoral heads of one body (150-200 mm typical)


class InferenceCancelled(Exception):
    """Raised inside the predictor when the user cancelled; nothing is written."""


@dataclass(frozen=True)
class InferenceOptions:
    device: str = "auto"
    fast: bool = True
    folds: tuple[str, ...] | None = None
    tile_step_size: float = 1.0
    whole_volume_tile: bool = False
    bfloat16: bool = True  # on a CPU with native bfloat16 (precision.py); False: float32 everywhere
    half_maximum_edges: bool = True  # fit the outer voxel layer to the CT's half maximum (edges.py)
    keep_largest_component: bool = True
    side: str = "both"


@dataclass(frozen=True)
class Femur:
    """One segmented femur: its side ('left', 'right' or 'femur' when unknown), label value and checks."""

    side: str
    value: int
    volume_ml: float
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class SegmentationResult:
    """The label (LABEL_VALUES per femur, on the input grid), the femurs found and every warning."""

    label: sitk.Image
    femurs: tuple[Femur, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)


def resolve_device(requested: str, notify: Callable[[str], None] = print) -> "torch.device":  # noqa: F821
    """Pick the torch device; ``auto`` falls back to the CPU with a message, an explicit missing one is refused."""
    import torch

    if requested not in DEVICES:
        raise FemurSegError(f"Unknown device '{requested}'; choose one of {', '.join(DEVICES)}.")
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        if cuda:
            return torch.device("cuda")
        if mps:
            return torch.device("mps")
        notify("No GPU found (CUDA or Apple MPS); running on the CPU, which takes seconds to a minute per volume.")
        return torch.device("cpu")
    if requested == "cuda" and not cuda:
        raise FemurSegError("Device 'cuda' was requested but PyTorch sees no CUDA GPU; choose 'cpu' or 'auto'.")
    if requested == "mps" and not mps:
        raise FemurSegError("Device 'mps' was requested but PyTorch has no Apple MPS device; choose 'cpu' or 'auto'.")
    return torch.device(requested)


def _network_divisor(configuration_manager) -> np.ndarray:
    """Per-axis factor the input size must be a multiple of (product of the encoder strides)."""
    strides = configuration_manager.network_arch_init_kwargs.get("strides")
    if not strides:
        return np.ones(len(configuration_manager.patch_size), dtype=int)
    return np.prod(np.array(strides, dtype=int), axis=0)


def _make_predictor_class():
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class FemurSegPredictor(nnUNetPredictor):
        """nnU-Net's predictor with an optional whole-volume patch; everything else is stock."""

        whole_volume_tile = True

        def predict_sliding_window_return_logits(self, input_image):
            if not self.whole_volume_tile:
                return super().predict_sliding_window_return_logits(input_image)
            configuration = self.configuration_manager.configuration
            trained_patch = configuration["patch_size"]
            divisor = _network_divisor(self.configuration_manager)
            shape = np.array(input_image.shape[1:])
            whole = np.maximum(np.ceil(shape / divisor).astype(int) * divisor, trained_patch)
            configuration["patch_size"] = [int(v) for v in whole]
            try:
                return super().predict_sliding_window_return_logits(input_image)
            finally:
                configuration["patch_size"] = trained_patch

    return FemurSegPredictor


class _Network:
    """One nnU-Net configuration, loaded once, predicting femur probabilities of an array with progress hooks."""

    def __init__(self, trained_folder: Path, folds: tuple[str, ...], checkpoint_name: str, femur_label: int,
                 options: InferenceOptions, device) -> None:
        import torch

        predictor_class = _make_predictor_class()
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints a CUDA-only notice on every CPU start
            self.predictor = predictor_class(
                tile_step_size=options.tile_step_size, use_mirroring=not options.fast,
                perform_everything_on_device=device.type == "cuda", device=device, allow_tqdm=False)
        self.predictor.whole_volume_tile = options.whole_volume_tile
        self.options = options
        self.femur_label = femur_label
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.predictor.initialize_from_trained_model_folder(str(trained_folder), use_folds=tuple(folds),
                                                                checkpoint_name=checkpoint_name)
        self.spacing = np.array(self.predictor.configuration_manager.spacing, dtype=float)  # (z, y, x)
        bfloat16_forward(self.predictor.network, device, options.bfloat16)
        self.conv_modules = [m for m in self.predictor.network.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
        self.convs_per_pass = self._count_convolutions_per_pass()

    def calls(self, shape_zyx: tuple[int, ...], spacing_zyx: np.ndarray) -> int:
        """Convolution calls predicting an array of this shape and spacing will make (for progress)."""
        from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

        passes = (1 if self.options.fast or not self.predictor.allowed_mirroring_axes
                  else 2 ** len(self.predictor.allowed_mirroring_axes))
        tiles = 1
        if not self.options.whole_volume_tile:
            patch = self.predictor.configuration_manager.patch_size
            resampled = np.round(np.array(shape_zyx) * spacing_zyx / self.spacing).astype(int)
            padded = [max(int(s), p) for s, p in zip(resampled, patch)]
            steps = compute_steps_for_sliding_window(padded, patch, self.options.tile_step_size)
            tiles = int(np.prod([len(axis_steps) for axis_steps in steps]))
        return max(1, passes * len(self.predictor.list_of_parameters) * self.convs_per_pass * tiles)

    def probability(self, array_zyx: np.ndarray, spacing_zyx: np.ndarray, on_conv: Callable) -> np.ndarray:
        """Femur probability (float32, same shape as ``array_zyx``) by nnU-Net's own pipeline."""
        handles = [module.register_forward_pre_hook(on_conv) for module in self.conv_modules]
        try:
            _, probabilities = self.predictor.predict_single_npy_array(
                array_zyx.astype(np.float32, copy=False)[None], {"spacing": [float(s) for s in spacing_zyx]},
                save_or_return_probabilities=True)
        finally:
            for handle in handles:
                handle.remove()
        return np.asarray(probabilities[self.femur_label], dtype=np.float32)

    def _count_convolutions_per_pass(self) -> int:
        """Convolutions one forward pass runs (unused deep-supervision heads are skipped by the network)."""
        import torch

        calls = [0]

        def count(_module, _inputs):
            calls[0] += 1

        handles = [module.register_forward_pre_hook(count) for module in self.conv_modules]
        divisor = _network_divisor(self.predictor.configuration_manager)
        channels = len(self.predictor.dataset_json["channel_names"])
        try:
            self.predictor.network.eval()
            with torch.inference_mode():
                self.predictor.network(torch.zeros((1, channels, *[2 * int(d) for d in divisor])))
        finally:
            for handle in handles:
                handle.remove()
        return max(1, calls[0])


class Segmenter:
    """A loaded model (locator + 1 mm network, or one network), reusable for many CTs."""

    def __init__(self, model_folder: str | os.PathLike, options: InferenceOptions = InferenceOptions(),
                 notify: Callable[[str], None] = print) -> None:
        from .models import require_loadable_checkpoints, validate_model_folder

        check_tile_step(options.tile_step_size)
        if options.side not in SIDES:
            raise FemurSegError(f"Side '{options.side}' is not one of {', '.join(SIDES)}.")
        self.options = options
        self.model = validate_model_folder(Path(model_folder))
        require_loadable_checkpoints(self.model)  # nnU-Net's loader below runs any code pickled into a checkpoint
        os.environ.setdefault("nnUNet_n_proc_DA", "1")  # keeps nnunetv2 from shelling out to `hostname`
        import torch

        self.device = resolve_device(options.device, notify)
        if self.device.type == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        if not torch.cuda.is_available() and "triton" not in sys.modules:
            # nnU-Net's predictor imports torch._dynamo, which loads the Triton GPU compiler if installed (torch's
            # CUDA wheels pull it in): ~75 MB of resident memory that a machine without a GPU never uses.
            sys.modules["triton"] = None  # type: ignore[assignment]  # makes `import triton` fail cleanly
        folds = options.folds or self.model.folds
        self.network = _Network(self.model.trained_folder, folds, self.model.checkpoint_name,
                                self.model.femur_label, options, self.device)
        self.locator = None
        if self.model.locator_folder is not None:
            locator_options = InferenceOptions(device=options.device, fast=True, tile_step_size=1.0,
                                               bfloat16=options.bfloat16)
            self.locator = _Network(self.model.locator_folder, ("all",), self.model.checkpoint_name,
                                    self.model.femur_label, locator_options, self.device)

    def segment(self, ct: sitk.Image, progress: ProgressCallback | None = None,
                cancel: threading.Event | None = None) -> sitk.Image:
        """The label alone (see :meth:`run`)."""
        return self.run(ct, progress, cancel).label

    def run(self, ct: sitk.Image, progress: ProgressCallback | None = None,
            cancel: threading.Event | None = None) -> SegmentationResult:
        """Femurs of ``ct``: label on ``ct``'s grid, sides, checks. Raises InferenceCancelled if ``cancel`` is set."""
        check_ct(ct, "CT")
        first = self.locator or self.network  # the network that sees the whole image
        check_network_input(ct.GetSize(), ct.GetSpacing(), first.spacing,
                            first.predictor.configuration_manager.patch_size, first.options.tile_step_size)
        report = progress or (lambda fraction, stage: None)
        cancel = cancel or threading.Event()
        report(0.0, "preparing")
        warnings_before = ct_warnings(ct)
        oriented = sitk.DICOMOrient(ct, "LPS") if ct.GetDirection() != (1, 0, 0, 0, 1, 0, 0, 0, 1) else ct
        array = sitk.GetArrayFromImage(oriented).astype(np.float32)
        spacing = np.array(oriented.GetSpacing()[::-1], dtype=float)
        steps = _Steps(report, cancel)

        if self.locator is None:
            steps.stage(self.network.calls(array.shape, spacing), 0.05, 0.95)
            femur_masks = self._components(self._predict(self.network, array, spacing, steps) > 0.5, array, spacing)
            if self.options.keep_largest_component:
                femur_masks = [solid_femur(mask, spacing) for mask in femur_masks]
        else:
            femur_masks = self._locate_and_segment(oriented, array, spacing, steps)
        if cancel.is_set():
            raise InferenceCancelled()
        report(0.96, "checking")
        heads: list[HeadFit | None] = [None] * len(femur_masks)
        verdict = ShapeVerdict(femur_masks, [], [], [])
        if self.options.keep_largest_component:
            verdict = femurs_by_shape(femur_masks, array, spacing)
            femur_masks, heads = verdict.masks, list(verdict.heads)
        if self.options.half_maximum_edges:
            femur_masks = [fit_edges_to_half_maximum(mask, array, spacing) for mask in femur_masks]
        femurs, label = self._assemble(femur_masks, heads, oriented, spacing)
        all_warnings = warnings_before + [w for f in femurs for w in f.warnings] + verdict.pair_warnings
        if not femurs:
            all_warnings += [NO_FEMUR] + verdict.rejected
        result_label = sitk.GetImageFromArray(label)
        result_label.CopyInformation(oriented)
        if oriented is not ct:
            result_label = sitk.Resample(result_label, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                         sitk.sitkUInt8)
        result_label.CopyInformation(ct)
        report(1.0, "done")
        return SegmentationResult(label=result_label, femurs=tuple(femurs), warnings=tuple(all_warnings))

    # --- steps ------------------------------------------------------------------------------------------------

    def _predict(self, network: _Network, array: np.ndarray, spacing: np.ndarray, steps: "_Steps") -> np.ndarray:
        """Probability on ``array``'s grid. The array is resampled to the network's spacing by SimpleITK's cubic
        B-spline, as nnU-Net's preprocessing resampled the training images (third order); the probability comes back
        linearly, as nnU-Net's does."""
        if np.allclose(spacing, network.spacing, rtol=0.02) or self.options.whole_volume_tile:
            return network.probability(array, spacing, steps.on_conv)
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
        resampled = _resample_to_spacing(image, network.spacing[::-1], sitk.sitkBSpline, -1000.0)
        probability = network.probability(sitk.GetArrayViewFromImage(resampled), network.spacing, steps.on_conv)
        back = sitk.GetImageFromArray(probability)
        back.CopyInformation(resampled)
        return sitk.GetArrayFromImage(sitk.Resample(back, image, sitk.Transform(), sitk.sitkLinear, 0.0))

    def _locate_and_segment(self, oriented: sitk.Image, array: np.ndarray, spacing: np.ndarray,
                            steps: "_Steps") -> list[np.ndarray]:
        coarse = _resample_to_spacing(oriented, self.locator.spacing[::-1], sitk.sitkLinear, -1000.0)
        coarse_array = sitk.GetArrayFromImage(coarse)
        steps.stage(self.locator.calls(coarse_array.shape, self.locator.spacing), 0.05, 0.25)
        located = self.locator.probability(coarse_array, self.locator.spacing, steps.on_conv) > 0.5
        pieces = self._components(located, coarse_array, self.locator.spacing)
        boxes = []
        for piece in pieces:
            found = np.argwhere(piece)
            corners = [np.array(oriented.TransformPhysicalPointToContinuousIndex(
                coarse.TransformContinuousIndexToPhysicalPoint([float(v) for v in index[::-1]])))[::-1]
                for index in (found.min(0), found.max(0))]
            margin = (ROI_MARGIN_MM + self.locator.spacing) / spacing
            start = np.maximum(np.floor(np.minimum(*corners) - margin).astype(int), 0)
            stop = np.minimum(np.ceil(np.maximum(*corners) + margin).astype(int) + 1, array.shape)
            boxes.append(tuple(slice(int(a), int(b)) for a, b in zip(start, stop)))
        steps.stage(sum(self.network.calls(array[box].shape, spacing) for box in boxes), 0.25, 0.95)
        masks = []
        for box in boxes:
            probability = self._predict(self.network, array[box], spacing, steps)
            femur = probability > 0.5  # as nnU-Net's argmax: a tie is background
            if self.options.keep_largest_component:
                femur = solid_femur(femur, spacing)
            full = np.zeros(array.shape, dtype=bool)
            full[box] = femur
            masks.append(full)
        return masks

    def _components(self, mask: np.ndarray, array: np.ndarray, spacing: np.ndarray) -> list[np.ndarray]:
        """Up to MAX_CANDIDATES pieces that can be femurs (``_is_bone``), the most femur-like first (femoral-head
        coverage, femur_shape.py; then size): a vertebra or the sacrum is often larger than a femur in view, so
        size alone picks the spine. All of ``mask`` when keep_largest_component is off."""
        if not self.options.keep_largest_component:
            return [mask] if mask.any() else []
        labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.bincount(labels.ravel())[1:] * float(np.prod(spacing)) / 1000.0
        pieces = [labels == int(index) + 1 for index in np.argsort(sizes)[::-1] if sizes[index] >= MIN_FEMUR_ML]
        bone = [piece for piece in pieces if _is_bone(piece, array, spacing)]
        ranked = sorted(bone, key=lambda piece: -fit_femoral_head(piece, spacing, array).coverage)  # then by size
        return ranked[:MAX_CANDIDATES]

    def _assemble(self, masks: list[np.ndarray], heads: list[HeadFit | None], oriented: sitk.Image,
                  spacing: np.ndarray) -> tuple[list[Femur], np.ndarray]:
        sides = femur_sides(masks, oriented)
        label = np.zeros(oriented.GetSize()[::-1], dtype=np.uint8)
        femurs = []
        for mask, head, side in zip(masks, heads, sides):
            if self.options.side != "both" and side != self.options.side:
                continue
            value = 1 if self.options.side != "both" else LABEL_VALUES.get(side, 1)
            label[mask & (label == 0)] = value
            name = side if side != "femur" else "the femur"
            check = check_femur(mask, tuple(spacing), name)
            shape_warnings = ((f"{name}: {head.describe()}; check that it is a femur",)
                              if head is not None and head.is_borderline else ())
            femurs.append(Femur(side=side, value=value, volume_ml=check.volume_ml,
                                warnings=check.warnings + shape_warnings))
        return femurs, label


class _Steps:
    """Progress over the network runs (each stage owns a share of the bar), and the cancel check every
    convolution makes."""

    def __init__(self, report: ProgressCallback, cancel: threading.Event) -> None:
        self.report, self.cancel = report, cancel
        self.calls, self.start, self.end, self.done = 1, 0.05, 0.95, 0

    def stage(self, calls: int, start: float, end: float) -> None:
        self.calls, self.start, self.end, self.done = max(1, calls), start, end, 0

    def on_conv(self, _module, _inputs) -> None:
        if self.cancel.is_set():
            raise InferenceCancelled()
        self.done += 1
        self.report(self.start + (self.end - self.start) * min(1.0, self.done / self.calls), "predicting")


@dataclass(frozen=True)
class ShapeVerdict:
    """Which candidates are femurs (masks, with their heads), what was left out and why, and doubts about a pair."""

    masks: list[np.ndarray]
    heads: list[HeadFit]
    rejected: list[str]
    pair_warnings: list[str]


def femurs_by_shape(masks: list[np.ndarray], array: np.ndarray, spacing: np.ndarray) -> ShapeVerdict:
    """Of the segmented candidates, the (at most two) that are femurs: bone (``_is_bone``) with a femoral head
    (femur_shape.py; borderline ones too, warned about), the clearest heads first, one per place (candidates
    that overlap are one femur)."""
    fits = [(mask, fit_femoral_head(mask, spacing, array)) for mask in masks
            if mask.any() and _is_bone(mask, array, spacing)]
    chosen: list[tuple[np.ndarray, HeadFit]] = []
    rejected = []
    for mask, head in sorted(fits, key=lambda pair: -pair[1].coverage):
        volume = float(mask.sum()) * float(np.prod(spacing)) / 1000.0
        if not (head.is_femur or head.is_borderline):
            rejected.append(f"not a femur: a {volume:.0f} ml piece ({head.describe()})")
            continue
        if any((mask & other).sum() > 0.3 * min(mask.sum(), other.sum()) for other, _ in chosen):
            continue
        if len(chosen) < 2:
            chosen.append((mask, head))
    pair = _pair_warnings(chosen[0][1], chosen[1][1]) if len(chosen) == 2 else []
    return ShapeVerdict([mask for mask, _ in chosen], [head for _, head in chosen], rejected, pair)


def _pair_warnings(first: HeadFit, second: HeadFit) -> list[str]:
    """Two femurs of one body are roughly mirror images, their heads PAIR_DISTANCE_MM apart (DESIGN.md §9)."""
    distance = float(np.linalg.norm(np.subtract(first.centre_mm, second.centre_mm)))
    radii = sorted((first.radius_mm, second.radius_mm))
    found = []
    if not PAIR_DISTANCE_MM[0] <= distance <= PAIR_DISTANCE_MM[1]:
        found.append(f"the two femoral heads are {distance:.0f} mm apart (a pair: {PAIR_DISTANCE_MM[0]:.0f}-"
                     f"{PAIR_DISTANCE_MM[1]:.0f} mm); check that both are femurs")
    if radii[0] < 0.75 * radii[1] and not (first.prosthetic or second.prosthetic):
        found.append(f"the two femoral heads differ in size ({radii[0]:.0f} and {radii[1]:.0f} mm); "
                     "check that both are femurs")
    return found


def _is_bone(piece: np.ndarray, array: np.ndarray, spacing: np.ndarray) -> bool:
    """Whether a piece can be a femur: not a speck (MIN_FEMUR_ML) and bone inside on average (MIN_FEMUR_MEAN_HU;
    measured: a 65 ml "femur" of air in the empty socket of a held-out specimen's potting, and litres of noisy
    water around the sample in a 3x field of view)."""
    return bool(piece.sum() * float(np.prod(spacing)) / 1000.0 >= MIN_FEMUR_ML
                and float(array[piece].mean()) >= MIN_FEMUR_MEAN_HU)


def solid_femur(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """The largest piece of ``mask`` without what hangs on it by a bridge thinner than 2 x BRIDGE_RADIUS_MM: the
    voxels within that distance of its largest piece after an erosion by BRIDGE_RADIUS_MM (SimpleITK). A femur is
    one solid body (its neck is 25-35 mm thick), so this cuts only what is not femur. Measured 2026-11-24: a longer-trained
    candidate model joined 5-25 ml of hip bone to a femur across the joint on one of 9 held-out in-vivo femurs and
    in one of 8 unseen training-subject renders; cut off, its in-vivo Dice went 0.981 -> 0.988 (held-out) and
    0.959 -> 0.979 (that render), no case lower by more than 0.0004; on model v4's held-out benchmark it changes
    nothing.
    """
    boxes = ndimage.find_objects(mask.astype(np.uint8))
    if not boxes:
        return mask
    box = tuple(slice(max(0, b.start - 1), min(n, b.stop + 1)) for b, n in zip(boxes[0], mask.shape))
    image = sitk.GetImageFromArray(mask[box].astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    radius = [max(1, int(round(BRIDGE_RADIUS_MM / s))) for s in spacing[::-1]]
    core = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.BinaryErode(image, radius, sitk.sitkBall)),
                                 sortByObjectSize=True) == 1
    if not np.any(sitk.GetArrayViewFromImage(core)):
        return largest_component(mask)  # thinner than the erosion everywhere: nothing to tell apart
    distance = sitk.SignedMaurerDistanceMap(core, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    near = sitk.GetArrayViewFromImage(distance) <= 2.0 * BRIDGE_RADIUS_MM
    solid = np.zeros_like(mask)
    solid[box] = largest_component(mask[box] & near)
    return solid


def _resample_to_spacing(image: sitk.Image, spacing_xyz: np.ndarray, interpolator: int, default: float) -> sitk.Image:
    """``image`` on a grid of ``spacing_xyz`` covering the same extent (same origin and direction)."""
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing_xyz)]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(),
                         tuple(float(s) for s in spacing_xyz), image.GetDirection(), default, sitk.sitkFloat32)


def femur_sides(masks: list[np.ndarray], oriented: sitk.Image) -> list[str]:
    """'left'/'right'/'femur' (unknown) per femur mask on ``oriented``'s grid: with two femurs by position (the one
    towards LPS +x is the patient's left), with one by its head lying medial to its shaft when the shaft runs along
    the scanner's z axis (in-vivo); a specimen lying in any other direction gives 'femur'."""
    if not masks:
        return []
    centroids = [np.array(oriented.TransformContinuousIndexToPhysicalPoint(
        [float(v) for v in np.argwhere(m).mean(0)[::-1]])) for m in masks]
    if len(masks) == 2:
        left = int(np.argmax([c[0] for c in centroids]))  # LPS x grows towards the patient's left
        return ["left" if i == left else "right" for i in range(2)]
    return [_side_from_shape(masks[0], oriented)]


def _side_from_shape(mask: np.ndarray, oriented: sitk.Image) -> str:
    """A femur with its shaft near the scanner's z axis: its head is medial, so head at -x of the shaft = left."""
    points = np.argwhere(mask)[:: max(1, int(mask.sum()) // 20000)].astype(float)
    direction = np.array(oriented.GetDirection()).reshape(3, 3)
    physical = np.array(oriented.GetOrigin()) + (points[:, ::-1] * np.array(oriented.GetSpacing())) @ direction.T
    centred = physical - physical.mean(0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    if abs(axis[2]) < np.cos(np.deg2rad(35)):
        return "femur"  # not lying along z (an ex-vivo specimen in any pose): the scanner frame says nothing
    z = physical[:, 2]
    top, bottom = z >= np.percentile(z, 80), z <= np.percentile(z, 30)
    medial_shift = physical[top, 0].mean() - physical[bottom, 0].mean()
    if abs(medial_shift) < 5.0:
        return "femur"
    return "left" if medial_shift < 0 else "right"
