"""The one I/O policy under every command and front end: what may be read, what may be written, and how.

Every file FemurSeg opens or writes goes through here, so a new command gets the checks by calling these
functions rather than by repeating them:

- **Names**: a path whose name is not valid UTF-8 is refused in one line (SimpleITK aborts the whole process on
  one), and so is a name component over the file system's 255 bytes; temporary names are shortened so that
  they stay within it too (a 245-character CT name used to make every batch run fail).
- **Inputs** must be regular files (a FIFO would hang the reader, a device would be read forever), followed
  through links, with dangling links and link loops said as such. A detached image header (NRRD ``data file:``,
  MetaImage ``ElementDataFile``) is followed to its data file, which must be a regular file inside the folder the
  caller allows (by default the header's own folder; the browser passes its allowed root, uploads allow none).
- **Outputs** are checked before any work against every input of the same call: not the same path, not the same
  file through a symlink or a hard link (``st_dev``/``st_ino``), and not inside a folder the command reads as a
  set (batch never writes into its CT or truth folder). Their folder must exist and take a real write.
- **Writes** are atomic: a temporary file beside the final name, fsynced, then renamed; a failed write leaves no
  file and says "disk full" when it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import FemurSegError

NAME_MAX_BYTES = 255  # one path component, on every file system FemurSeg runs on (ext4, xfs, btrfs, APFS, NTFS)
HEADER_MAX_BYTES = 1 << 20  # a detached-header search reads no further than this
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
UMASK = os.umask(0)  # the process umask, read once (os.umask can only be read by setting it)
os.umask(UMASK)


def resolved(path: str | os.PathLike) -> Path:
    """``path`` with links resolved as far as they go (a link loop or a dangling link stops there, no exception)."""
    return Path(os.path.realpath(path))


def shown(path: str | os.PathLike) -> str:
    """``path`` as printable text, undecodable bytes as ``\\xNN`` (a message must never fail to print)."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def check_name(path: str | os.PathLike, what: str) -> Path:
    """Refuse a path that is not valid UTF-8 or has a component over NAME_MAX_BYTES; returns it as a Path."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FemurSegError(f"{what} '{shown(text)}' has a name that is not valid UTF-8; rename it (letters, digits, "
                            "'_', '-' and '.' are safe everywhere).") from None
    for part in Path(text).parts:
        if len(part.encode("utf-8")) > NAME_MAX_BYTES:
            raise FemurSegError(f"{what} '{text[:60]}...' has a name of {len(part.encode('utf-8'))} bytes, over the "
                                f"file system's {NAME_MAX_BYTES}; use a shorter name.")
    return Path(text)


def plain_component(text: object, what: str, pattern: str = r"[A-Za-z0-9_-]+") -> str:
    """``text`` if it is a plain name matching ``pattern`` (default letters, digits, '_' and '-'): a value read
    from an untrusted file may only name a path component once it passed this."""
    if not isinstance(text, str) or not re.fullmatch(pattern, text) or len(text) > 200:
        raise FemurSegError(f"{what} {text!r} is not a plain name (letters, digits, '_' and '-' only); refused.")
    return text


def _describe_missing(path: Path, what: str) -> FemurSegError:
    if os.path.islink(path):
        return FemurSegError(f"{what} '{shown(path)}' is a link to '{shown(os.readlink(path))}', which does not exist; "
                             "give the file itself.")
    return FemurSegError(f"{what} '{shown(path)}' does not exist; check the path.")


def require_input_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it names a regular file (links followed); else FemurSegError saying what it is instead."""
    path = check_name(path, what)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise _describe_missing(path, what) from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise FemurSegError(f"{what} '{shown(path)}' is a link loop; give the file itself.") from None
        raise FemurSegError(f"{what} '{shown(path)}' cannot be opened ({error.strerror or error}).") from None
    if stat.S_ISDIR(mode):
        raise FemurSegError(f"{what} '{shown(path)}' is a folder, not a file (a DICOM series? convert it to NRRD or "
                            "NIfTI first, e.g. with Slicer or dcm2niix).")
    if not stat.S_ISREG(mode):
        raise FemurSegError(f"{what} '{shown(path)}' is not a regular file (a FIFO, socket or device); give a "
                            "regular file.")
    return path


def require_input_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it names an existing folder (links followed)."""
    path = check_name(path, what)
    if not path.is_dir():
        if path.exists() or os.path.islink(path):
            raise FemurSegError(f"{what} '{shown(path)}' is not a folder.")
        raise FemurSegError(f"{what} '{shown(path)}' does not exist or is not a folder.")
    return path


def read_bytes(path: str | os.PathLike, what: str, max_bytes: int) -> bytes:
    """The content of a regular file of at most ``max_bytes`` (a JSON or CSV file is small; more is not one)."""
    path = require_input_file(path, what)
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as error:
        raise FemurSegError(f"{what} '{shown(path)}' cannot be read ({error.strerror or error}).") from None
    if len(data) > max_bytes:
        raise FemurSegError(f"{what} '{shown(path)}' is over {max_bytes:,} bytes; that is not a file of this kind.")
    return data


# --- detached image data -------------------------------------------------------------------------------------------

def _header_fields(path: Path) -> tuple[str, dict[str, str]]:
    """("nrrd" | "meta" | "", fields) of an image header, read as text up to its end (NRRD's blank line,
    MetaImage's ElementDataFile) or HEADER_MAX_BYTES."""
    with open(path, "rb") as handle:
        head = handle.read(HEADER_MAX_BYTES)
    fields: dict[str, str] = {}
    if head.startswith(b"NRRD0"):
        for line in head.split(b"\n")[1:]:
            line = line.rstrip(b"\r")
            if not line:
                break
            if line.startswith(b"#"):
                continue
            key, separator, value = line.decode("latin-1").partition(":")
            if separator and not value.startswith("="):  # "key:=value" is a key/value pair, not a field
                fields[key.strip().lower().replace(" ", "")] = value.strip()
        return "nrrd", fields
    suffix = path.name.lower()
    if suffix.endswith((".mha", ".mhd")) or head.lstrip().startswith((b"ObjectType", b"NDims")):
        for line in head.split(b"\n"):
            key, separator, value = line.decode("latin-1").partition("=")
            if separator:
                fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
        return "meta", fields
    return "", fields


def detached_data_file(header: Path, what: str = "Image") -> Path | None:
    """The data file an NRRD or MetaImage header names (relative to the header's folder), None when the voxels are
    in the file itself. List and pattern forms (many data files) are refused: FemurSeg reads one."""
    kind, fields = _header_fields(header)
    value = fields.get("datafile") if kind == "nrrd" else fields.get("ElementDataFile") if kind == "meta" else None
    if value is None or (kind == "meta" and value.upper() == "LOCAL"):
        return None
    if not value or value.upper().startswith("LIST") or "%" in value:
        raise FemurSegError(f"{what} '{shown(header)}' names its voxel data as a list or pattern of files "
                            f"('{value[:80]}'); FemurSeg reads one data file: save it as one .nrrd, .nii.gz or .mha.")
    data = Path(value)
    return data if data.is_absolute() else header.parent / data


def check_detached_data(header: Path, allowed: Path | None, what: str) -> Path | None:
    """Refuse a detached data file that is not a regular file inside ``allowed`` (None: the header's folder)."""
    data = detached_data_file(header, what)
    if data is None:
        return None
    root = resolved(allowed if allowed is not None else header.parent)
    if not resolved(data).is_relative_to(root):
        raise FemurSegError(f"{what} '{shown(header)}' takes its voxels from '{shown(data)}', outside "
                            f"'{shown(root)}'; keep the data file beside its header (or save one .nrrd/.mha file).")
    return require_input_file(data, f"The data file of {what}")


# --- outputs -------------------------------------------------------------------------------------------------------

def inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies under it, links resolved."""
    return resolved(path).is_relative_to(resolved(folder))


class InputFiles:
    """The input files of one call, looked up by resolved path and by device and inode (links and hard links
    included) in constant time, so a cohort of thousands is checked as fast as one file."""

    def __init__(self, paths: Iterable[str | os.PathLike]) -> None:
        self.by_path: dict[Path, Path] = {}
        self.by_inode: dict[tuple[int, int], Path] = {}
        for path in map(Path, paths):
            self.by_path[resolved(path)] = path
            with contextlib.suppress(OSError):
                status = os.stat(path)
                self.by_inode[(status.st_dev, status.st_ino)] = path

    def find(self, path: Path) -> Path | None:
        """The input that ``path`` is, if any."""
        found = self.by_path.get(resolved(path))
        if found is None and self.by_inode:
            with contextlib.suppress(OSError):
                status = os.stat(path)
                found = self.by_inode.get((status.st_dev, status.st_ino))
        return found


def check_against_inputs(output: str | os.PathLike, inputs: Iterable[str | os.PathLike] | InputFiles = (),
                         input_folders: Iterable[str | os.PathLike] = (), what: str = "Output") -> Path:
    """Refuse an output that is an input file (path, link or hard link) or lies in a folder read as a set."""
    path = check_name(output, what)
    source = (inputs if isinstance(inputs, InputFiles) else InputFiles(inputs)).find(path)
    if source is not None:
        raise FemurSegError(f"{what} '{shown(path)}' is the input '{shown(source)}'; writing it would destroy the "
                            "input. Choose another output name.")
    for folder in input_folders:
        folder = Path(folder)
        if inside(path, folder):
            raise FemurSegError(f"{what} '{shown(path)}' lies inside the input folder '{shown(folder)}', which is read "
                                "as a whole; choose an output folder outside it.")
    return path


def require_writable(folder: Path) -> None:
    """A real write, not os.access: it also sees read-only mounts and ACLs, and is not fooled by running as root."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".femurseg-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise FemurSegError(f"Cannot write into '{shown(folder)}' ({error.strerror or error}); choose a writable "
                            "folder.") from None


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                      input_folders: Iterable[str | os.PathLike] = (), what: str = "Output") -> Path:
    """An output file, checked before any work: not an input, not a folder, in an existing writable folder."""
    path = check_against_inputs(path, inputs, input_folders, what)
    if path.is_dir():
        raise FemurSegError(f"{what} '{shown(path)}' is a folder; give a file name inside it.")
    if os.path.lexists(path) and not path.is_file():
        raise FemurSegError(f"{what} '{shown(path)}' exists and is not a regular file (a FIFO, device or dangling "
                            "link); choose another name.")
    if not path.parent.is_dir():
        raise FemurSegError(f"Output folder '{shown(path.parent)}' does not exist; create it first.")
    require_writable(path.parent)
    return path


def prepare_output_folder(folder: str | os.PathLike, input_folders: Iterable[str | os.PathLike] = (),
                          what: str = "Output folder") -> Path:
    """Create ``folder`` if needed, after checking it is not inside a folder read as a whole, and make sure it
    takes a write."""
    folder = check_against_inputs(folder, (), input_folders, what)
    if folder.exists() and not folder.is_dir():
        raise FemurSegError(f"{what} '{shown(folder)}' is a file; choose a folder name.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FemurSegError(f"Cannot create the output folder '{shown(folder)}' ({error.strerror or error}).") from None
    require_writable(folder)
    return folder


# --- atomic writes --------------------------------------------------------------------------------------------------

def _truncated(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[:max(0, max_bytes)].decode("utf-8", "ignore")


def temporary_affixes(final_name: str, suffix: str) -> tuple[str, str]:
    """(prefix, suffix) for mkstemp beside ``final_name``: ``.<name>.XXXXXXXX.part<suffix>``, the name shortened
    so the whole stays within NAME_MAX_BYTES."""
    tail = f".part{suffix}"
    room = NAME_MAX_BYTES - 2 - 8 - len(tail.encode("utf-8"))  # the dots around the name, mkstemp's 8 letters
    return f".{_truncated(final_name, room)}.", tail


def disk_full_message(path: Path, error: BaseException | None = None) -> str | None:
    """'the disk is full' when it is (an errno, or less than 1 MB free), else None."""
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return f"the disk holding '{shown(path.parent)}' is full; free some space or choose another folder"
    with contextlib.suppress(OSError):
        if shutil.disk_usage(path.parent).free < 1 << 20:
            return f"the disk holding '{shown(path.parent)}' is full; free some space or choose another folder"
    return None


def file_suffix(name: str) -> str:
    """The extension a writer picks its format by (``.nii.gz`` and ``.seg.nrrd`` are one), ``.tmp`` for none."""
    for double in (".nii.gz", ".seg.nrrd"):
        if name.lower().endswith(double):
            return name[-len(double):].lower()
    return Path(name).suffix.lower() or ".tmp"


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``final_path`` that ends like it (or in ``suffix``: writers pick their format
    by it); rename it into place only if the block succeeds."""
    final_path = check_name(final_path, "Output")
    folder = final_path.parent
    if not folder.is_dir():
        raise FemurSegError(f"Output folder '{shown(folder)}' does not exist; create it first.")
    prefix, tail = temporary_affixes(final_path.name, suffix or file_suffix(final_path.name))
    try:
        handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=tail, dir=folder)
    except OSError as error:
        raise FemurSegError(f"Cannot write into '{shown(folder)}' ({error.strerror or error}); choose a writable "
                            "folder.") from None
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        os.chmod(temporary_path, 0o666 & ~UMASK)  # mkstemp makes 0600; give the file normal permissions
        with open(temporary_path, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary_path, final_path)
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            temporary_path.unlink()
        raise FemurSegError(f"Could not write '{shown(final_path)}': "
                            f"{disk_full_message(final_path, error) or error.strerror or error}.") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary_path.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically (see atomic_path)."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoint trust, FE provenance)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
