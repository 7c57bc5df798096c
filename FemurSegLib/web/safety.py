"""Checks on what the browser sends: upload size and content, and paths confined to allowed folders.

The server may be reachable by other local users, so every trigger's arguments are an API for strangers: each is
validated as the command line validates its option (a number a number in range, a split train or test, a model a
name from the model list, never a server path). A path typed in the page is only trusted after it is resolved
(symlinks followed) and found inside an allowed root, and the image it names may take its voxels only from a data
file inside that same root; an upload is one file (a detached header's data file is refused) and is only loaded
after the reader the command line uses (:func:`FemurSegLib.imageio.read_ct` or ``read_label``) accepted it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import SimpleITK as sitk

from ..dataset import CASE_NAME, DATASET_FOLDER
from ..errors import FemurSegError
from ..imageio import IMAGE_SUFFIXES, image_suffix, read_ct, read_label
from ..iopolicy import resolved
from ..models import list_models
from ..surface import SURFACE_FORMATS

DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024**2
SURFACES_FOLDER = "Surfaces"


def resolve_inside(text: str, roots: list[Path], what: str) -> Path:
    """The existing file ``text`` names, if it lies inside one of ``roots`` once resolved; else FemurSegError."""
    text = text.strip()
    if not text:
        raise FemurSegError(f"Type the path of the {what}.")
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        candidate = roots[0] / candidate
    resolved = candidate.resolve()
    if not any(resolved.is_relative_to(root.resolve()) for root in roots):
        allowed = ", ".join(str(root) for root in roots)
        raise FemurSegError(f"'{text}' is outside the folders this server may read ({allowed}).")
    if not resolved.is_file():
        raise FemurSegError(f"The {what} '{text}' does not exist or is not a file.")
    return resolved


def root_of(path: Path, roots: list[Path]) -> Path:
    """The allowed root that holds ``path`` (resolved): the only folder its image may take data files from."""
    for root in roots:
        if resolved(path).is_relative_to(resolved(root)):
            return resolved(root)
    raise FemurSegError(f"'{path}' is outside the folders this server may read.")


def read_inside(text: str, roots: list[Path], what: str, kind: str) -> tuple[Path, sitk.Image]:
    """The CT (``kind`` "ct") or label ("fill") a typed path names, read with its data confined to its root."""
    path = resolve_inside(text, roots, what)
    reader = read_ct if kind == "ct" else read_label
    return path, reader(path, what, data_root=root_of(path, roots))


def check_minutes(text: object) -> float:
    """A fine-tuning budget from the page, as ``finetune --minutes`` takes it (finite and positive; the upper limit
    is plan_finetune's)."""
    try:
        minutes = float(str(text).strip())
    except ValueError:
        raise FemurSegError(f"Time budget '{str(text)[:40]}' is not a number of minutes.") from None
    if not 0 < minutes < float("inf"):
        raise FemurSegError(f"Time budget {minutes:g} is not a positive number of minutes.")
    return minutes


def check_split(text: object) -> str:
    """'train' or 'test', as ``export [--test]``."""
    if text not in ("train", "test"):
        raise FemurSegError(f"Split '{str(text)[:40]}' must be train or test.")
    return str(text)


def model_by_name(text: object) -> str | None:
    """A model chosen in the page: a name from the model list (or none: the bundled default), never a path, so
    the page cannot make the server load or fine-tune a folder of its choosing."""
    if text in (None, ""):
        return None
    names = [model.name for model in list_models()]
    if not isinstance(text, str) or text not in names:
        raise FemurSegError(f"Model '{str(text)[:80]}' is not in the model list ({', '.join(names) or 'none'}); choose "
                            "one there.")
    return text


def dataset_dir_inside(datasets_root: Path, folder_name: str) -> Path:
    """``datasets_root/folder_name`` for a plain nnU-Net dataset folder name that stays inside the root."""
    name = folder_name.strip()
    if not DATASET_FOLDER.fullmatch(name):
        raise FemurSegError(
            f"Dataset folder '{folder_name}' is not a plain nnU-Net dataset name like Dataset101_FemurCorrected "
            "(no slashes, '..' or absolute paths)."
        )
    root = datasets_root.resolve()
    target = (root / name).resolve()
    if target.parent != root:
        raise FemurSegError(f"Dataset folder '{folder_name}' leads outside {root} (a symlink?); refused.")
    return target


def check_case_name(case: str) -> str:
    """The case name stripped, if it is a plain name export_case accepts."""
    case = case.strip()
    if not CASE_NAME.fullmatch(case):
        raise FemurSegError(f"Case name '{case}' may only use letters, digits, '_' and '-'.")
    return case


def surface_path_inside(datasets_root: Path, case: str, file_format: str) -> Path:
    """``datasets_root/Surfaces/<case>.<format>`` (folder created), refused if the folder leads outside the root."""
    if file_format not in SURFACE_FORMATS:
        raise FemurSegError(f"Surface format '{file_format}' must be one of {', '.join(SURFACE_FORMATS)}.")
    case = check_case_name(case)
    root = datasets_root.resolve()
    folder = root / SURFACES_FOLDER
    folder.mkdir(exist_ok=True)
    if folder.resolve() != folder:
        raise FemurSegError(f"{folder} leads outside {root} (a symlink?); refused.")
    return folder / f"{case}.{file_format}"


def check_upload_size(name: str, size: int, max_bytes: int) -> None:
    """Refuse an upload over the limit before reading it."""
    if size > max_bytes:
        raise FemurSegError(
            f"'{name}' is {size / 1024**2:.1f} MB; uploads are limited to {max_bytes / 1024**2:.0f} MB. "
            "Put the file under an allowed folder and open it by path instead."
        )


def validated_upload(name: str, content: bytes, max_bytes: int, folder: Path, kind: str) -> tuple[Path, sitk.Image]:
    """Write an upload (``kind``: "ct", or "fill" for a fill label) to a temporary file in ``folder`` and read it
    back with the command line's checks (imageio.read_ct or read_label).

    The file keeps the upload's image extension (SimpleITK picks its reader by it); on refusal it is removed.
    """
    if kind not in ("ct", "fill"):
        raise FemurSegError(f"Upload kind '{str(kind)[:40]}' must be ct or fill.")
    check_upload_size(name, len(content), max_bytes)
    suffix = image_suffix(name)
    if suffix not in IMAGE_SUFFIXES or suffix == ".mhd":
        raise FemurSegError(f"'{name}' is not an NRRD, NIfTI or MHA file; upload a 3D image (.nrrd, .nii.gz, .mha).")
    handle, temporary = tempfile.mkstemp(suffix=suffix, dir=folder)
    path = Path(temporary)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(content)
        image = read_ct(path, "The uploaded CT", detached=False) if kind == "ct" \
            else read_label(path, "The uploaded fill label", detached=False)
    except FemurSegError as error:  # name the upload, not the server's temporary file
        path.unlink(missing_ok=True)
        raise FemurSegError(str(error).replace(f"'{path}'", f"'{name}'").replace(str(path), name)) from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, image
