"""Finding, validating, installing and removing nnU-Net v2 femur models.

A model is an nnU-Net results folder: ``DatasetXXX_Name/<Trainer>__<Plans>__<configuration>/`` holding
``dataset.json``, ``plans.json`` and ``fold_<f>/checkpoint_final.pth``, exactly what nnU-Net writes and what
``nnUNetv2_export_model_to_zip`` packs. The bundled model lives in ``Resources/Models/<name>-v<version>/``
with a model card; user models are installed into a per-user folder (``FEMURSEG_MODELS_DIR`` overrides it).

Zips and model folders from users are untrusted data: a folder is checked as a schema (FemurSegLib.modelschema:
no links or FIFOs, JSON types and ranges, plain names) before anything uses it; extraction refuses absolute
paths, ``..``, links, compression methods other than stored and deflated, sizes that differ from those declared,
CRC errors, zip bombs and archives larger than the free space; and plans.json may only name network classes from
dynamic_network_architectures and torch.nn (nnU-Net imports whatever it names). The bundled model is found only
in Resources/Models (never a folder of that name in the current directory), and one broken installed model is
reported and skipped, never fatal to the others. nnU-Net itself loads checkpoints with
``torch.load(weights_only=False)``, which runs any code pickled into the file, so
:func:`require_loadable_checkpoints` is the gate every front end passes (``inference.Segmenter`` calls it):
each checkpoint must be an intact PyTorch zip (CRCs, a well-formed pickle) that loads with
``torch.load(weights_only=True)``, which cannot run code, unless the user trusted that exact file at install
(``--trust``): its SHA-256 is then recorded in the installed folder's ``TRUST_FILE``, so a changed file loses the
trust, and a trust file that came with a folder or zip is never honoured.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import pickletools
import re
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .dataset import DATASET_FOLDER, femur_label
from .errors import FemurSegError
from .iopolicy import (UMASK, check_name, disk_full_message, file_sha256, plain_component, require_input_file, resolved,
                       shown)
from .modelschema import check_card, check_dataset_json, check_plans, check_tree, load_json

BUNDLED_MODELS_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"
DEFAULT_MODEL = "FemurReal3dSmall-v7"
MAX_ZIP_BYTES = 4 * 1024**3
MAX_ZIP_MEMBERS = 20_000  # as modelschema.MAX_ENTRIES
MAX_COMPRESSION_RATIO = 100  # deflated checkpoints shrink ~1.1x, JSON ~10x; a zip bomb 1000x
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
TRUST_FILE = ".femurseg-trust.json"
# plans.json names classes that nnU-Net imports and calls with plans.json's arguments; only these packages may be named.
ALLOWED_CLASS_PREFIXES = ("dynamic_network_architectures.", "torch.nn.")


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
    """FEMURSEG_MODELS_DIR, else $XDG_DATA_HOME/FemurSeg/models; an empty or relative XDG_DATA_HOME is ignored, as
    the XDG specification says (it put models into ./FemurSeg/models)."""
    configured = os.environ.get("FEMURSEG_MODELS_DIR")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
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
    root = check_name(root, "Model folder")  # its name is printed and becomes the model's name
    if os.path.islink(root):
        raise FemurSegError(f"Model folder '{shown(root)}' is a link; links are refused in models (they can lead "
                            "anywhere): give the folder itself.")
    if not root.is_dir():
        raise FemurSegError(f"Model folder '{shown(root)}' does not exist.")
    check_tree(root)
    card_path = root / "model_card.json"
    card = load_json(card_path, "model card") if card_path.is_file() else {}
    check_card(card, card_path)
    trained = _find_trained_folder(root, card.get("configuration"))
    locator = _find_trained_folder(root, card["locator"]) if card.get("locator") else None
    if locator is not None and not (locator / "fold_all" / "checkpoint_final.pth").is_file():
        raise FemurSegError(f"The model's locator '{locator}' has no fold_all/checkpoint_final.pth; copy the whole "
                            "model folder.")
    for folder in [trained] + ([locator] if locator is not None else []):
        configuration = plain_component(folder.name.split("__")[-1], f"Model folder '{shown(folder)}' configuration")
        check_dataset_json(load_json(folder / "dataset.json", "dataset.json"), folder / "dataset.json")
        plans = load_json(folder / "plans.json", "plans.json")
        check_plans(plans, configuration, folder / "plans.json")
        _check_plans_classes(plans["configurations"], folder / "plans.json")
    dataset_json = load_json(trained / "dataset.json", "dataset.json")
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


def _check_plans_classes(configurations: dict, path: Path) -> None:
    """Refuse class names nnU-Net would import from anywhere (``pydoc.locate``) before it builds the network."""
    for name, configuration in configurations.items():
        architecture = configuration.get("architecture", {}) if isinstance(configuration, dict) else {}
        architecture = architecture if isinstance(architecture, dict) else {"network_class_name": architecture}
        arguments = architecture.get("arch_kwargs", {})
        arguments = arguments if isinstance(arguments, dict) else {}
        imported = architecture.get("_kw_requires_import", [])
        named = [architecture.get("network_class_name")]
        named += [arguments.get(key) if isinstance(key, str) else key
                  for key in (imported if isinstance(imported, list) else [imported])]
        foreign = [n for n in named
                   if n is not None and not (isinstance(n, str) and n.startswith(ALLOWED_CLASS_PREFIXES))]
        if foreign:
            raise FemurSegError(
                f"plans.json '{path}' configuration '{name}' names {foreign[0]!r}, outside the packages a model may "
                f"use ({', '.join(p.rstrip('.') for p in ALLOWED_CLASS_PREFIXES)}); refused, since nnU-Net would "
                "import and run it."
            )


def checkpoint_paths(model: ModelInfo) -> dict[str, Path]:
    """Each fold's checkpoint file by fold name (the locator's as "locator")."""
    paths = {fold: model.trained_folder / f"fold_{fold}" / model.checkpoint_name for fold in model.folds}
    if model.locator_folder is not None:
        paths["locator"] = model.locator_folder / "fold_all" / model.checkpoint_name
    return paths


def needs_full_pickle(checkpoint: Path) -> bool:
    """False for an intact nnU-Net checkpoint that the weights-only loader opens; True when it needs the full pickle
    loader (which can run code); FemurSegError saying "corrupt" for anything else. Nothing in the file is run."""
    import torch

    def corrupt(detail: str) -> FemurSegError:
        return FemurSegError(f"Checkpoint '{checkpoint}' is corrupt ({detail}); re-export or download the model again.")

    try:
        with zipfile.ZipFile(checkpoint) as archive:
            damaged = archive.testzip()  # the weights-only loader does not check CRCs: a flipped byte would load
            pickled = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
            if damaged is not None:
                raise corrupt(f"CRC error in {damaged}")
            if len(pickled) != 1:
                raise corrupt("no data.pkl inside: not a PyTorch checkpoint")
            for _ in pickletools.genops(archive.read(pickled[0])):  # parses opcodes only, runs nothing
                pass
    except (zipfile.BadZipFile, EOFError, ValueError) as error:
        raise corrupt(f"{str(error) or type(error).__name__}; not an intact PyTorch zip checkpoint") from None
    except OSError as error:
        raise FemurSegError(f"Checkpoint '{checkpoint}' cannot be read: {error.strerror or error}.") from None
    try:
        content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a global outside torch's allow-list: only the full loader could open it
        return True
    except Exception as error:  # noqa: BLE001 - torch raises many types for damaged files
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise corrupt(f"{type(error).__name__}: {first_line}".rstrip(": ")) from None
    weights = content.get("network_weights") if isinstance(content, dict) else None
    if not isinstance(weights, dict) or not isinstance(content.get("trainer_name"), str) \
            or "configuration" not in (content.get("init_args") or {}):
        raise corrupt("no network_weights, trainer_name and init_args: not an nnU-Net checkpoint")
    return False


def _trusted_hashes(model: ModelInfo) -> dict[str, str]:
    """The checkpoint hashes the user trusted at install; empty for a folder used in place (its own file is ignored)."""
    root = model.root.resolve()
    if root.parent != user_models_dir().resolve() or not (root / TRUST_FILE).is_file():
        return {}
    try:
        record = json.loads((root / TRUST_FILE).read_text())
        return {str(k): str(v) for k, v in record["checkpoints"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def require_loadable_checkpoints(model: ModelInfo) -> None:
    """The gate before nnU-Net's ``torch.load(weights_only=False)``: raise unless every checkpoint is intact and
    weights-only loadable, or is the very file the user trusted when installing the model."""
    trusted = _trusted_hashes(model)
    for fold, path in checkpoint_paths(model).items():
        if not needs_full_pickle(path):
            continue
        relative = path.relative_to(model.root).as_posix()
        if relative in trusted:
            if trusted[relative] == file_sha256(path):
                continue
            raise FemurSegError(
                f"Checkpoint '{path}' of model '{model.name}' changed since it was installed with --trust; it was not "
                f"loaded. If you trust the new file, remove the model and install it again with --trust."
            )
        raise FemurSegError(
            f"Checkpoint '{path}' (fold {fold}) needs Python's full pickle loader, which can run code hidden in the "
            f"file; it was not loaded. If you trust its source: femurseg models install {model.root} --trust"
        )


def scan_models() -> tuple[list[ModelInfo], list[str]]:
    """Bundled models first, then the user's installed ones, and a line for each folder that is not a usable
    model: one broken installed model is reported and skipped, never fatal to the others."""
    found: list[ModelInfo] = []
    problems: list[str] = []
    for folder, bundled in [(BUNDLED_MODELS_DIR, True), (user_models_dir(), False)]:
        try:
            children = sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
        except OSError as error:
            problems.append(f"models folder '{shown(folder)}' cannot be listed ({error.strerror or error})")
            continue
        for child in children:
            if not child.is_dir() and not child.is_symlink():
                continue
            try:
                found.append(validate_model_folder(child, bundled=bundled))
            except (FemurSegError, OSError) as error:
                problems.append(f"skipped the {'bundled' if bundled else 'installed'} model '{shown(child.name)}': "
                                f"{error}")
    return found, problems


def list_models() -> list[ModelInfo]:
    """The usable models (see scan_models)."""
    return scan_models()[0]


def resolve_model(name_or_path: str | None) -> ModelInfo:
    """The bundled default (None), a model by name (bundled or installed; a name always means the model, never a
    folder of that name in the current directory), else a model folder by path."""
    if name_or_path is None:
        return validate_model_folder(BUNDLED_MODELS_DIR / DEFAULT_MODEL, bundled=True)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise FemurSegError(f"Model {name_or_path!r} is not a model name or folder; give one (femurseg models list).")
    models, problems = scan_models()
    for model in models:
        if model.name == name_or_path:
            return model
    broken = [problem for problem in problems if f"model '{name_or_path}':" in problem]
    if broken:
        problem = broken[0].replace("skipped the", "the", 1)
        raise FemurSegError(problem[0].upper() + problem[1:])
    candidate = Path(name_or_path)
    if candidate.exists() or candidate.is_symlink():
        return validate_model_folder(candidate)
    available = ", ".join(m.name for m in models) or "none"
    raise FemurSegError(f"No model named '{shown(name_or_path)}'. Installed: {available}. Give a folder path or "
                        "install it.")


def _safe_extract(archive: Path, destination: Path) -> None:
    """Unpack an untrusted zip: every member checked by name, kind, method, size and ratio before a byte is written,
    the disk's free space before the first, and the sizes and CRCs while unpacking."""
    def refuse(detail: str) -> FemurSegError:
        return FemurSegError(f"'{shown(archive)}' {detail}; refused. Re-export the model "
                             "(nnUNetv2_export_model_to_zip) or download it again.")

    try:
        handle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise FemurSegError(f"'{shown(archive)}' is not a readable zip file ({error}).") from None
    with handle:
        members = handle.infolist()
        if len(members) > MAX_ZIP_MEMBERS:
            raise refuse(f"holds {len(members)} entries (a model holds a few dozen)")
        total = sum(m.file_size for m in members)
        if total > MAX_ZIP_BYTES:
            raise refuse(f"unpacks to {total / 1e9:.1f} GB, over the {MAX_ZIP_BYTES / 1e9:.0f} GB limit")
        root = resolved(destination)
        for member in members:
            target = resolved(destination / member.filename)
            kind = (member.external_attr >> 16) & 0o170000
            if member.filename.startswith(("/", "\\")) or ".." in Path(member.filename).parts \
                    or kind not in (0, 0o100000, 0o040000) or not target.is_relative_to(root):
                raise refuse(f"contains an unsafe entry '{member.filename}' (absolute path, '..', link or device)")
            if member.compress_type not in ZIP_METHODS:
                raise refuse(f"packs '{member.filename}' with compression method {member.compress_type}; only "
                             f"{' and '.join(ZIP_METHODS.values())} are read")
            if member.flag_bits & 0x1:
                raise refuse(f"holds an encrypted entry '{member.filename}'")
            if member.file_size > 1 << 20 and member.file_size > MAX_COMPRESSION_RATIO * max(member.compress_size, 1):
                raise refuse(f"entry '{member.filename}' unpacks {member.file_size / max(member.compress_size, 1):.0f}"
                             f" times larger than it is packed (a zip bomb?)")
        free = shutil.disk_usage(destination).free
        if total + (64 << 20) > free:
            raise FemurSegError(f"'{shown(archive)}' unpacks to {total / 1e6:.0f} MB but the models folder's disk has "
                                f"{free / 1e6:.0f} MB free; free some space or set FEMURSEG_MODELS_DIR.")
        for member in members:
            _extract_member(handle, member, destination, refuse)


def _extract_member(handle: zipfile.ZipFile, member: zipfile.ZipInfo, destination: Path, refuse) -> None:
    """One member, never more bytes than it declares; zipfile checks the CRC when the member is read to its end."""
    target = destination / member.filename
    if member.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with handle.open(member) as source, open(target, "xb") as out:
            for block in iter(lambda: source.read(1 << 20), b""):
                written += len(block)
                if written > member.file_size:
                    raise refuse(f"entry '{member.filename}' holds more than the {member.file_size:,} bytes it "
                                 "declares")
                out.write(block)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as error:
        raise refuse(f"entry '{member.filename}' is damaged ({error})") from None
    except FileExistsError:
        raise refuse(f"holds the entry '{member.filename}' twice") from None
    except OSError as error:
        raise FemurSegError(f"Could not unpack '{member.filename}': "
                            f"{disk_full_message(target, error) or error.strerror or error}.") from None
    if written != member.file_size:
        raise refuse(f"entry '{member.filename}' holds {written:,} bytes, not the {member.file_size:,} it declares")


def check_new_model_name(name: str) -> str:
    """Refuse a name a new model cannot take: characters outside a plain file name, or a model's name already (a
    bundled name too: the bundled model would hide the new one)."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name) or name.startswith("."):
        raise FemurSegError(f"Model name '{name}' may only use letters, digits, '.', '_' and '-'.")
    if (user_models_dir() / name).exists() or (BUNDLED_MODELS_DIR / name).is_dir():
        raise FemurSegError(f"A model named '{name}' already exists; remove it first or choose another name.")
    return name


def install_model(source: Path, name: str | None = None, trust_pickle: bool = False) -> ModelInfo:
    """Install a model folder or nnU-Net export zip into the user models folder; validated before it lands.

    Corrupt checkpoints are refused; ones that need the full pickle loader only with ``trust_pickle``, which
    records their SHA-256 in TRUST_FILE (see require_loadable_checkpoints).
    """
    source = check_name(source, "Model")
    if source.is_dir() and not source.is_symlink():
        check_tree(source)  # before the copy: links would be followed out of the folder, a FIFO would hang it
    elif source.suffix.lower() == ".zip" or source.is_file():
        require_input_file(source, "Model zip")
    else:
        raise FemurSegError(f"'{shown(source)}' does not exist or is a link; give the model zip or folder itself.")
    target_dir = user_models_dir()
    name = check_new_model_name(name or (source.name.removesuffix(".zip") if source.is_file() else source.name))
    final = target_dir / name
    created = not target_dir.exists()
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target_dir))
    except OSError as error:
        raise FemurSegError(f"Cannot write into the models folder '{target_dir}' ({error.strerror or error}); "
                            "set FEMURSEG_MODELS_DIR to a writable folder.") from None
    try:
        if source.is_file():
            _safe_extract(source, staging)
        else:
            shutil.copytree(source, staging, dirs_exist_ok=True, symlinks=True)  # check_tree: there are none
        (staging / TRUST_FILE).unlink(missing_ok=True)  # trust comes from this user's --trust only
        model = validate_model_folder(staging, name=name)
        checkpoints = checkpoint_paths(model)
        unsafe = [fold for fold, path in checkpoints.items() if needs_full_pickle(path)]
        if unsafe and not trust_pickle:
            raise FemurSegError(
                f"The checkpoint(s) of fold(s) {', '.join(unsafe)} need Python's full pickle loader, which can run "
                "code hidden in the file. Install only models from a source you trust, with --trust."
            )
        if trust_pickle:
            record = {"trusted_with": "femurseg models install --trust", "source": str(source.resolve()),
                      "checkpoints": {p.relative_to(staging).as_posix(): file_sha256(p) for p in checkpoints.values()}}
            (staging / TRUST_FILE).write_text(json.dumps(record, indent=2) + "\n")
        os.chmod(staging, 0o777 & ~UMASK)  # mkdtemp makes 0700: others could not use a zip-installed model
        os.replace(staging, final)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if created:  # a refused first install leaves no empty models folder behind
            with contextlib.suppress(OSError):
                target_dir.rmdir()
        if isinstance(error, OSError):  # copying or writing: a full disk, a read-only models folder
            raise FemurSegError(f"Could not install '{shown(source)}': "
                                f"{disk_full_message(staging, error) or error.strerror or error}.") from None
        if isinstance(error, FemurSegError):  # name the user's zip or folder, not the deleted staging folder
            raise FemurSegError(str(error).replace(str(staging), str(source))) from None
        raise
    return validate_model_folder(final, name=name)


def remove_model(name: str) -> Path:
    """Delete an installed model's folder; a link in the models folder is refused (what it points to is not ours)."""
    folder = user_models_dir() / name
    plain = bool(re.fullmatch(r"[A-Za-z0-9_.\-]+", name)) and not name.startswith(".")
    if plain and folder.is_symlink():
        raise FemurSegError(f"Installed model '{name}' is a link to '{shown(os.readlink(folder))}', which FemurSeg did "
                            f"not install; delete the link '{shown(folder)}' yourself.")
    if not plain or not folder.is_dir():
        bundled = plain and (BUNDLED_MODELS_DIR / name).is_dir()
        hint = " It is bundled with FemurSeg and cannot be removed." if bundled else ""
        raise FemurSegError(f"No installed model named '{shown(name)}'.{hint}")
    try:
        shutil.rmtree(folder)
    except OSError as error:
        raise FemurSegError(f"Could not remove '{shown(folder)}' ({error.strerror or error}); check its "
                            "permissions.") from None
    return folder
