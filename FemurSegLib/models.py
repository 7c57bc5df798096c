"""Finding, validating, installing and removing nnU-Net v2 femur models.

A model is an nnU-Net results folder: ``DatasetXXX_Name/<Trainer>__<Plans>__<configuration>/`` holding
``dataset.json``, ``plans.json`` and ``fold_<f>/checkpoint_final.pth``, exactly what nnU-Net writes and what
``nnUNetv2_export_model_to_zip`` packs. The bundled model lives in ``Resources/Models/<name>-v<version>/``
with a model card; user models are installed into a per-user folder (``FEMURSEG_MODELS_DIR`` overrides it).

Zips and checkpoints from users are untrusted: extraction refuses absolute paths, ``..``, links and oversized
archives, and every checkpoint is first opened with ``torch.load(weights_only=True)``, which cannot run code.
A checkpoint that needs the full pickle loader is refused unless the user says they trust its source.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .dataset import DATASET_FOLDER, femur_label
from .errors import FemurSegError

BUNDLED_MODELS_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"
DEFAULT_MODEL = "FemurPhantom3dSmall-v3"
MAX_ZIP_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class ModelInfo:
    """A validated model: where its nnU-Net folder is and what it segments."""

    name: str
    root: Path
    trained_folder: Path
    folds: tuple[str, ...]
    femur_label: int
    label_name: str
    checkpoint_name: str = "checkpoint_final.pth"
    card: dict = field(default_factory=dict)
    bundled: bool = False
    locator_folder: Path | None = None  # a coarse configuration that finds the femurs first (model card "locator")

    @property
    def version(self) -> str:
        return str(self.card.get("version", "unknown"))


def user_models_dir() -> Path:
    configured = os.environ.get("FEMURSEG_MODELS_DIR")
    if configured:
        return Path(configured)
    base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "FemurSeg" / "models"


def _find_trained_folder(root: Path, configuration: str | None = None) -> Path:
    """The folder with plans.json + dataset.json inside ``root`` (itself, or DatasetXXX/<trainer folder>);
    ``configuration`` picks one where the model card names several (a locator and the main network)."""
    if (root / "plans.json").is_file() and (root / "dataset.json").is_file():
        return root
    candidates = [p.parent for p in root.glob("*/*/plans.json")] + [p.parent for p in root.glob("*/plans.json")]
    candidates = sorted({c for c in candidates if (c / "dataset.json").is_file()})
    if configuration is not None:
        candidates = [c for c in candidates if c.name.split("__")[-1] == configuration]
        if not candidates:
            raise FemurSegError(f"'{root}' has no trained folder for configuration '{configuration}' named in its "
                                "model card; copy the whole model folder.")
    if len(candidates) == 1:
        trained = candidates[0]
        dataset_folder = trained.parent.name
        if trained.parent != root and not DATASET_FOLDER.fullmatch(dataset_folder):
            raise FemurSegError(
                f"Model folder '{trained}' is not inside a 'DatasetXXX_Name' folder (found '{dataset_folder}'). "
                "When unzipping an nnU-Net model keep its top-level DatasetXXX_ folder."
            )
        return trained
    if len(candidates) > 1:
        listing = ", ".join(str(c.relative_to(root)) for c in candidates)
        raise FemurSegError(f"'{root}' holds several models ({listing}); point to one of them.")
    if any(root.glob("fold_*")) or any(root.glob("*/fold_*")):
        raise FemurSegError(
            f"'{root}' has fold folders but no plans.json and dataset.json beside them; copy the whole "
            "nnU-Net results folder (DatasetXXX_Name/Trainer__Plans__configuration)."
        )
    raise FemurSegError(
        f"'{root}' is not an nnU-Net v2 model: no dataset.json and plans.json found. Expected "
        "DatasetXXX_Name/<Trainer>__<Plans>__<configuration>/ with dataset.json, plans.json and fold_N/."
    )


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise FemurSegError(f"The model's {what} '{path}' cannot be read: {error}. Re-export the model.") from None


def _femur_label(dataset_json: dict, path: Path) -> tuple[int, str]:
    """The model's single non-background label (the same rule the dataset exporter applies)."""
    found = femur_label(dataset_json.get("labels"))
    if found is None:
        raise FemurSegError(
            f"The model's dataset.json '{path}' must define background 0 and exactly one femur label; "
            f"it defines {sorted(dataset_json.get('labels', {})) or 'none'}."
        )
    name, value = found
    return value, name


def validate_model_folder(root: Path, name: str | None = None, bundled: bool = False) -> ModelInfo:
    """Check that ``root`` is a usable nnU-Net v2 femur model; raise FemurSegError with what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise FemurSegError(f"Model folder '{root}' does not exist.")
    card_path = root / "model_card.json"
    card = _read_json(card_path, "model card") if card_path.is_file() else {}
    trained = _find_trained_folder(root, card.get("configuration"))
    locator = _find_trained_folder(root, card["locator"]) if card.get("locator") else None
    if locator is not None and not (locator / "fold_all" / "checkpoint_final.pth").is_file():
        raise FemurSegError(f"The model's locator '{locator}' has no fold_all/checkpoint_final.pth; copy the whole "
                            "model folder.")
    dataset_json = _read_json(trained / "dataset.json", "dataset.json")
    plans = _read_json(trained / "plans.json", "plans.json")
    configuration = trained.name.split("__")[-1]
    if configuration not in plans.get("configurations", {}):
        raise FemurSegError(
            f"plans.json in '{trained}' has no configuration '{configuration}' "
            f"(it has {sorted(plans.get('configurations', {}))})."
        )
    folds = tuple(sorted(p.name.removeprefix("fold_") for p in trained.glob("fold_*") if p.is_dir()))
    if not folds:
        raise FemurSegError(f"Model '{trained}' has no fold_N folder; the trained weights are missing.")
    missing = [f for f in folds if not (trained / f"fold_{f}" / "checkpoint_final.pth").is_file()]
    if missing:
        raise FemurSegError(
            f"Model '{trained}' lacks checkpoint_final.pth in fold(s) {', '.join(missing)}; "
            "training did not finish or the copy is incomplete."
        )
    femur_label, label_name = _femur_label(dataset_json, trained / "dataset.json")
    return ModelInfo(
        name=name or root.name, root=root, trained_folder=trained, folds=folds,
        femur_label=femur_label, label_name=label_name, card=card, bundled=bundled, locator_folder=locator,
    )


def check_checkpoint_safe(checkpoint: Path) -> bool:
    """True when the checkpoint opens with the weights-only loader (cannot run code when loaded)."""
    import torch

    try:
        torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unpickling refusal means "needs the full loader"
        return False
    return True


def list_models() -> list[ModelInfo]:
    """Bundled models first, then the user's installed ones; broken folders are skipped."""
    found: list[ModelInfo] = []
    for folder, bundled in [(BUNDLED_MODELS_DIR, True), (user_models_dir(), False)]:
        if not folder.is_dir():
            continue
        for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                found.append(validate_model_folder(child, bundled=bundled))
            except FemurSegError:
                continue
    return found


def resolve_model(name_or_path: str | None) -> ModelInfo:
    """A model by installed name, by path, or the bundled default when None."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    candidate = Path(name_or_path)
    if candidate.exists():
        return validate_model_folder(candidate)
    for model in list_models():
        if model.name == name_or_path:
            return model
    available = ", ".join(m.name for m in list_models()) or "none"
    raise FemurSegError(f"No model named '{name_or_path}'. Installed: {available}. Give a folder path or install it.")


def _safe_extract(archive: Path, destination: Path) -> None:
    try:
        handle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise FemurSegError(f"'{archive}' is not a readable zip file ({error}).") from None
    with handle:
        members = handle.infolist()
        total = sum(m.file_size for m in members)
        if total > MAX_ZIP_BYTES:
            raise FemurSegError(f"'{archive}' unpacks to {total / 1e9:.1f} GB, over the {MAX_ZIP_BYTES / 1e9:.0f} GB limit.")
        root = destination.resolve()
        for member in members:
            target = (destination / member.filename).resolve()
            is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
            if member.filename.startswith(("/", "\\")) or ".." in Path(member.filename).parts or is_link \
                    or not target.is_relative_to(root):
                raise FemurSegError(
                    f"'{archive}' contains an unsafe entry '{member.filename}' (absolute path, '..' or link); refused."
                )
        handle.extractall(destination)


def install_model(source: Path, name: str | None = None, trust_pickle: bool = False) -> ModelInfo:
    """Install a model folder or nnU-Net export zip into the user models folder; validated before it lands."""
    source = Path(source)
    if not source.exists():
        raise FemurSegError(f"'{source}' does not exist.")
    target_dir = user_models_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    name = name or (source.name.removesuffix(".zip") if source.is_file() else source.name)
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name) or name.startswith("."):
        raise FemurSegError(f"Model name '{name}' may only use letters, digits, '.', '_' and '-'.")
    final = target_dir / name
    if final.exists():
        raise FemurSegError(f"A model named '{name}' is already installed; remove it first or choose another name.")
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target_dir))
    try:
        if source.is_file():
            _safe_extract(source, staging)
        else:
            shutil.copytree(source, staging, dirs_exist_ok=True, symlinks=False)
        model = validate_model_folder(staging, name=name)
        unsafe = [f for f in model.folds
                  if not check_checkpoint_safe(model.trained_folder / f"fold_{f}" / model.checkpoint_name)]
        if unsafe and not trust_pickle:
            raise FemurSegError(
                f"The checkpoint(s) of fold(s) {', '.join(unsafe)} need Python's full pickle loader, which can run "
                "code hidden in the file. Install only models from a source you trust, with --trust."
            )
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return validate_model_folder(final, name=name)


def remove_model(name: str) -> Path:
    folder = user_models_dir() / name
    if not folder.is_dir() or name.startswith(".") or "/" in name:
        bundled = (BUNDLED_MODELS_DIR / name).is_dir()
        hint = " It is bundled with FemurSeg and cannot be removed." if bundled else ""
        raise FemurSegError(f"No installed model named '{name}'.{hint}")
    shutil.rmtree(folder)
    return folder
