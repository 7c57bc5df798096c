"""Run an nnU-Net v2 femur model on a CT, in process, with progress, cancellation and device fallback.

The work is nnU-Net's own: ``nnUNetPredictor.predict_single_npy_array`` preprocesses, predicts and resamples
back. FemurSeg adds three things around it:

- **Fewest tiles** (default): nnU-Net's own sliding window with ``tile_step_size=1.0``, i.e. the fewest
  trained-size patches that cover the volume (they still overlap where the volume is not a multiple of the patch,
  blended with nnU-Net's Gaussian). With ``fast`` (no test-time mirroring) this is the speed-up ``benchmarks/``
  measures against stock defaults (mirroring, step 0.5). On the bundled model, held-out phantoms seeds 1-4:
  step 1.0 Dice 0.9838 in 1.96 s, step 0.5 0.9849 in 3.08 s (2026-11-23).
- **Whole-volume tile** (``whole_volume_tile=True``): the patch size is raised to the preprocessed volume's shape
  (rounded up to what the network's pooling needs), so one forward pass does it all (1.2 s). Only for models
  trained on near-whole-volume patches: instance normalisation then sees another field of view, and the bundled
  model lost 0.8 Dice points that way (0.9760); fine-tuning it on 96 x 96 x 160 patches won back only part.
- **Progress and cancel**: a forward pre-hook on every network stage reports progress and raises
  :class:`InferenceCancelled` as soon as the cancel event is set, so cancel returns within one stage, not
  one volume.
- **Geometry**: the CT is reoriented to the model's axis order (identity direction), predicted, reoriented back
  and given the input's exact geometry; the largest connected component is kept.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import FemurSegError
from .fill import largest_component
from .imageio import check_volume

ProgressCallback = Callable[[float, str], None]

DEVICES = ("auto", "cpu", "cuda", "mps")


class InferenceCancelled(Exception):
    """Raised inside the predictor when the user cancelled; nothing is written."""


@dataclass(frozen=True)
class InferenceOptions:
    device: str = "auto"
    fast: bool = True
    folds: tuple[str, ...] | None = None
    tile_step_size: float = 1.0
    whole_volume_tile: bool = False
    keep_largest_component: bool = True


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


class Segmenter:
    """A loaded model, reusable for many CTs (load once: predictor start-up costs 1-2 s)."""

    def __init__(self, model_folder: str | os.PathLike, options: InferenceOptions = InferenceOptions(),
                 notify: Callable[[str], None] = print) -> None:
        from .models import require_loadable_checkpoints, validate_model_folder

        if not 0 < options.tile_step_size <= 1:
            raise FemurSegError(f"Tile step {options.tile_step_size} is out of range: give a fraction of the patch "
                                "in (0, 1], e.g. 1.0 (fewest tiles, the default) or 0.5 (nnU-Net's default).")
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
        predictor_class = _make_predictor_class()
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints a CUDA-only notice on every CPU start
            self.predictor = predictor_class(
                tile_step_size=options.tile_step_size,
                use_mirroring=not options.fast,
                perform_everything_on_device=self.device.type == "cuda",
                device=self.device,
                allow_tqdm=False,
            )
        self.predictor.whole_volume_tile = options.whole_volume_tile
        folds = options.folds or self.model.folds
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.predictor.initialize_from_trained_model_folder(
                str(self.model.trained_folder), use_folds=tuple(folds), checkpoint_name=self.model.checkpoint_name
            )
        # Every convolution checks for cancel: the longest wait is one convolution, not one network stage.
        self._conv_modules = [m for m in self.predictor.network.modules()
                              if isinstance(m, torch.nn.modules.conv._ConvNd)]
        self._convs_per_pass = self._count_convolutions_per_pass()

    def segment(self, ct: sitk.Image, progress: ProgressCallback | None = None,
                cancel: threading.Event | None = None) -> sitk.Image:
        """Femur label (uint8 0/1) on ``ct``'s grid. Raises InferenceCancelled if ``cancel`` is set."""
        check_volume(ct, "CT")
        report = progress or (lambda fraction, stage: None)
        cancel = cancel or threading.Event()
        report(0.0, "preparing")
        oriented = sitk.DICOMOrient(ct, "LPS") if ct.GetDirection() != (1, 0, 0, 0, 1, 0, 0, 0, 1) else ct
        array = sitk.GetArrayFromImage(oriented).astype(np.float32)[None]
        spacing = [float(s) for s in reversed(oriented.GetSpacing())]

        passes = (1 if self.options.fast or not self.predictor.allowed_mirroring_axes
                  else 2 ** len(self.predictor.allowed_mirroring_axes))
        expected = max(1, passes * len(self.predictor.list_of_parameters) * self._convs_per_pass * self._tiles(array))
        done = [0]

        def on_stage(_module, _inputs):
            if cancel.is_set():
                raise InferenceCancelled()
            done[0] += 1
            report(0.05 + 0.9 * min(1.0, done[0] / expected), "predicting")

        handles = [module.register_forward_pre_hook(on_stage) for module in self._conv_modules]
        try:
            if cancel.is_set():
                raise InferenceCancelled()
            report(0.05, "predicting")
            segmentation = self.predictor.predict_single_npy_array(array, {"spacing": spacing})
        finally:
            for handle in handles:
                handle.remove()
        if cancel.is_set():
            raise InferenceCancelled()
        report(0.96, "post-processing")
        femur = np.asarray(segmentation) == self.model.femur_label
        if self.options.keep_largest_component:
            femur = largest_component(femur)
        label = sitk.GetImageFromArray(femur.astype(np.uint8))
        label.CopyInformation(oriented)
        if oriented is not ct:
            label = sitk.Resample(label, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        label.CopyInformation(ct)
        report(1.0, "done")
        return label

    def _count_convolutions_per_pass(self) -> int:
        """Convolutions one forward pass runs (unused deep-supervision heads are skipped by the network)."""
        import torch

        calls = [0]

        def count(_module, _inputs):
            calls[0] += 1

        handles = [module.register_forward_pre_hook(count) for module in self._conv_modules]
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

    def _tiles(self, array: np.ndarray) -> int:
        """How many network calls per pass nnU-Net will make (1 with the whole-volume tile)."""
        if self.options.whole_volume_tile:
            return 1
        from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

        patch = self.predictor.configuration_manager.patch_size
        shape = [max(s, p) for s, p in zip(array.shape[1:], patch)]
        steps = compute_steps_for_sliding_window(shape, patch, self.options.tile_step_size)
        return int(np.prod([len(axis_steps) for axis_steps in steps]))
