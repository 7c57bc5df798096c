"""A model folder from a stranger is data: its tree and its JSON files checked as a schema before anything uses them.

nnU-Net trusts its own results folders; FemurSeg installs folders and zips from anywhere, then builds paths from
their names (fine-tuning writes ``raw/<dataset_name>``), allocates tensors of their patch size and imports the
classes they name. So, before any of that:

- **The tree** holds folders and regular files only: no symlink (dangling, looping, to a FIFO or to a file outside
  the folder), no FIFO or device, at most MAX_ENTRIES entries.
- **JSON** files are small, parse, and have the types nnU-Net expects (a list where a dict belongs was a traceback
  in every command); every name a path may be built from (dataset, plans and configuration names) is a plain
  ``[A-Za-z0-9_-]`` name; patch sizes, spacings, strides, kernel sizes and stage counts lie in ranges a femur
  network can have (a patch of 10000^3 tried to allocate 4 TB).
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from .errors import FemurSegError
from .iopolicy import plain_component, read_bytes, shown

MAX_ENTRIES = 20_000  # a results folder with cross-validation predictions holds thousands
MAX_DEPTH = 8
MAX_JSON_BYTES = 16 * 1024**2
DATASET_NAME = r"Dataset\d{3}_[A-Za-z0-9_-]+"
PATCH_RANGE = (4, 1024)  # voxels along an axis
MAX_PATCH_VOXELS = 256**3  # float32 activations of the first stage alone: 2 GB per 32 features
SPACING_RANGE_MM = (0.01, 50.0)
STRIDE_RANGE = (1, 8)
KERNEL_RANGE = (1, 15)
MAX_STAGES = 12
MAX_FEATURES = 4096
MAX_INHERITANCE = 8


def check_tree(root: Path, what: str = "Model folder") -> None:
    """Refuse links and anything but folders and regular files anywhere under ``root`` (nothing followed)."""
    count = 0
    pending = [(root, 0)]
    while pending:
        folder, depth = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as error:
            raise FemurSegError(f"{what} '{shown(folder)}' cannot be listed ({error.strerror or error}).") from None
        for entry in entries:
            count += 1
            if count > MAX_ENTRIES:
                raise FemurSegError(f"{what} '{shown(root)}' holds over {MAX_ENTRIES} files; an nnU-Net model holds a "
                                    "few dozen. Point to the model folder itself.")
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                raise FemurSegError(f"{what} '{shown(root)}' holds a link '{shown(entry.path)}'; links are refused in "
                                    "models (they can lead anywhere): copy the files themselves.")
            if stat.S_ISDIR(mode):
                if depth + 1 > MAX_DEPTH:
                    raise FemurSegError(f"{what} '{shown(root)}' nests folders deeper than {MAX_DEPTH}; an nnU-Net "
                                        "model is DatasetXXX_Name/Trainer__Plans__configuration/fold_N.")
                pending.append((Path(entry.path), depth + 1))
            elif not stat.S_ISREG(mode):
                raise FemurSegError(f"{what} '{shown(root)}' holds '{shown(entry.path)}', which is not a regular file "
                                    "(a FIFO, socket or device); refused.")


def load_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a small regular file, or FemurSegError naming the file and what to do."""
    data = read_bytes(path, f"The model's {what}", MAX_JSON_BYTES)
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise FemurSegError(f"The model's {what} '{shown(path)}' cannot be read: {error}. Re-export the model.") \
            from None
    if not isinstance(value, dict):
        raise FemurSegError(f"The model's {what} '{shown(path)}' holds a JSON {type(value).__name__}, not an object; "
                            "re-export the model.")
    return value


def _fail(path: Path, detail: str) -> FemurSegError:
    return FemurSegError(f"'{shown(path)}' {detail}; re-export the model (nnU-Net writes it right).")


def _number_list(value: Any, length: int | None, low: float, high: float, integer: bool) -> bool:
    kinds = (int,) if integer else (int, float)
    return (isinstance(value, list) and (length is None or len(value) == length) and len(value) > 0
            and all(isinstance(v, kinds) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high
                    for v in value))


def check_card(card: dict[str, Any], path: Path) -> None:
    """The fields FemurSeg reads from model_card.json: configuration and locator are plain names."""
    for key in ("configuration", "locator"):
        if card.get(key) is not None:
            plain_component(card[key], f"Model card '{shown(path)}' field '{key}'")
    for key, kinds in (("name", (str,)), ("version", (str, int)), ("base_model", (dict,)), ("training", (dict,))):
        if card.get(key) is not None and not isinstance(card[key], kinds):
            raise _fail(path, f"field '{key}' is a {type(card[key]).__name__}")


def check_dataset_json(dataset_json: dict[str, Any], path: Path) -> None:
    """labels: names to whole numbers 0-255; channel_names an object; file_ending a plain image ending."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                               and 0 <= v <= 255 for k, v in labels.items()):
        raise _fail(path, "has no 'labels' object of names to values 0-255")
    if not isinstance(dataset_json.get("channel_names", {}), dict):
        raise _fail(path, "has a 'channel_names' that is not an object")
    ending = dataset_json.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or ending not in (".nii.gz", ".nrrd", ".nii", ".mha"):
        raise _fail(path, f"has file_ending {ending!r}, not one of .nii.gz, .nrrd, .nii, .mha")
    number = dataset_json.get("numTraining", 0)
    if not isinstance(number, int) or isinstance(number, bool) or number < 0:
        raise _fail(path, f"has numTraining {number!r}, not a count")


def effective_configuration(configurations: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    """A configuration with what it inherits (nnU-Net's ``inherits_from``: the child's keys win)."""
    chain: list[dict[str, Any]] = []
    current: str | None = name
    while current is not None:
        if len(chain) >= MAX_INHERITANCE or current not in configurations:
            raise _fail(path, f"configuration '{name}' inherits from a missing or looping configuration "
                              f"'{current}'")
        configuration = configurations[current]
        if not isinstance(configuration, dict):
            raise _fail(path, f"configuration '{current}' is not an object")
        chain.append(configuration)
        parent = configuration.get("inherits_from")
        current = None if parent is None else plain_component(parent, f"plans.json '{shown(path)}' inherits_from")
    merged: dict[str, Any] = {}
    for configuration in reversed(chain):
        merged.update(configuration)
    return merged


def check_plans(plans: dict[str, Any], configuration: str, path: Path) -> None:
    """Names are plain (they become folder names), the configuration used is a network FemurSeg can run."""
    plain_component(plans.get("dataset_name"), f"plans.json '{shown(path)}' dataset_name", DATASET_NAME)
    plain_component(plans.get("plans_name"), f"plans.json '{shown(path)}' plans_name")
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or not configurations:
        raise _fail(path, "has no 'configurations' object")
    for name in configurations:
        plain_component(name, f"plans.json '{shown(path)}' configuration name")
    if configuration not in configurations:
        raise FemurSegError(f"plans.json in '{shown(path.parent)}' has no configuration '{configuration}' "
                            f"(it has {sorted(configurations)}).")
    used = effective_configuration(configurations, configuration, path)
    patch = used.get("patch_size")
    if not _number_list(patch, None, *PATCH_RANGE, integer=True) or len(patch) not in (2, 3) \
            or math.prod(patch) > MAX_PATCH_VOXELS:
        raise _fail(path, f"configuration '{configuration}' has patch_size {str(patch)[:80]}: 2 or 3 whole numbers "
                          f"{PATCH_RANGE[0]}-{PATCH_RANGE[1]}, at most {MAX_PATCH_VOXELS:,} voxels, are expected")
    if not _number_list(used.get("spacing"), len(patch), *SPACING_RANGE_MM, integer=False):
        raise _fail(path, f"configuration '{configuration}' has spacing {str(used.get('spacing'))[:80]}: "
                          f"{len(patch)} numbers in {SPACING_RANGE_MM[0]:g}-{SPACING_RANGE_MM[1]:g} mm are expected")
    batch = used.get("batch_size", 1)
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= 1024:
        raise _fail(path, f"configuration '{configuration}' has batch_size {batch!r}")
    architecture = used.get("architecture", {})
    arguments = architecture.get("arch_kwargs", {}) if isinstance(architecture, dict) else None
    if not isinstance(arguments, dict) or not isinstance(architecture.get("_kw_requires_import", []), list):
        raise _fail(path, f"configuration '{configuration}' has an 'architecture' that is not an object with "
                          "'arch_kwargs'")
    stages = arguments.get("n_stages", 1)
    if not isinstance(stages, int) or isinstance(stages, bool) or not 1 <= stages <= MAX_STAGES:
        raise _fail(path, f"configuration '{configuration}' has n_stages {stages!r}, not 1-{MAX_STAGES}")
    for key, (low, high) in (("strides", STRIDE_RANGE), ("kernel_sizes", KERNEL_RANGE)):
        value = arguments.get(key)
        if value is not None and not (isinstance(value, list) and len(value) <= MAX_STAGES and all(
                isinstance(v, int) and not isinstance(v, bool) and low <= v <= high
                or _number_list(v, len(patch), low, high, integer=True) for v in value)):
            raise _fail(path, f"configuration '{configuration}' has {key} {str(value)[:80]}: whole numbers "
                              f"{low}-{high} per axis and stage are expected")
    features = arguments.get("features_per_stage")
    if features is not None and not _number_list(features, None, 1, MAX_FEATURES, integer=True):
        raise _fail(path, f"configuration '{configuration}' has features_per_stage {str(features)[:80]}")
