"""``femurseg batch``: a cohort with one loaded model; per case a label, an overlay PNG, optionally a surface, the
fill baseline and a finite-element model per femur, and its row(s) in ``results.csv`` and ``report.html``.

Safe to interrupt and to resume: every file is written atomically, and a case is done only once its row file
``rows/<case>.json`` exists; it is written last and records the settings that made it, so a re-run skips the
done cases and redoes those made with other settings. ``results.csv`` and ``report.html`` are rebuilt from all
row files after every case under a lock, so the shards of one cohort (``--shard I/N``: a SLURM job array, a Dask
map) can share one output folder and the last shard to finish leaves the whole table. A case that fails gets an
error row, does not stop the others, and is tried again by the next run.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import html
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TextIO
from urllib.parse import quote

import numpy as np
import SimpleITK as sitk
from filelock import FileLock

from .errors import FemurSegError
from .fe.calibration import read_rods
from .fe.pipeline import STEM, FEOptions, output_files, run_fe
from .imageio import IMAGE_SUFFIXES, image_suffix, read_ct, read_label, require_same_grid, write_image
from .iopolicy import (NAME_MAX_BYTES, InputFiles, check_against_inputs, check_name, prepare_output_folder,
                       read_bytes, require_input_folder, shown, write_bytes_atomic)
from .metrics import dice
from .surface import SURFACE_FORMATS, SurfaceOptions, write_label_surface

if TYPE_CHECKING:
    from .inference import Femur, Segmenter

NO_FEMUR_STATUS = "no femur"  # a case that ran and holds no femur (its row's side is "none")
CSV_COLUMNS = ("case", "side", "status", "volume_ml", "mean_hu", "fill_dice", "truth_dice", "warnings", "error",
               "seconds", "finished", "model", "ct", "label", "overlay", "surface", "fe", "fe_elements",
               "fe_stiffness_n_mm", "fe_warnings")
FE_COLUMNS = ("fe_elements", "fe_stiffness_n_mm", "fe_warnings")
FOLDERS = {"labels": "labels", "fill": "fill", "overlays": "overlays", "surfaces": "surfaces", "fe": "fe",
           "rows": "rows"}
RESULTS_CSV, REPORT_HTML, LOCK_FILE = "results.csv", "report.html", ".results.lock"
CT_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s != ".seg.nrrd")  # a .seg.nrrd is a segmentation, not a CT
LOCK_TIMEOUT_S = 120
MAX_CSV_BYTES = 64 * 1024**2
# the longest name a case's files get: "<case>" + this (".nii.gz", ".json", ".png", ".stl" ...)
LONGEST_CASE_SUFFIX = max(len(s) for s in (".nrrd", ".nii.gz", ".nii", ".mha", ".json", ".png",
                                            *(f".{f}" for f in SURFACE_FORMATS)))


@dataclass(frozen=True)
class Case:
    name: str
    ct: Path


@dataclass(frozen=True)
class BatchSettings:
    model: str | None = None
    device: str = "auto"
    fill: bool = False
    truth_dir: Path | None = None
    surface_format: str | None = None  # one of SURFACE_FORMATS: write a surface per case
    surface: SurfaceOptions = SurfaceOptions()
    fe: FEOptions | None = None  # write an FE model per femur (fe/pipeline.py, as ``femurseg fe``)
    fe_calibration: str = "internal"  # a rods file (.csv, .json) or "internal"

    def __post_init__(self) -> None:
        if self.surface_format not in (None, *SURFACE_FORMATS):
            raise FemurSegError(f"Surface format '{self.surface_format}' must be one of {', '.join(SURFACE_FORMATS)}.")
        if self.truth_dir is not None:
            require_input_folder(self.truth_dir, "Truth folder")
        if self.fe is not None and self.fe_calibration != "internal":
            read_rods(self.fe_calibration)  # bad rods stop the cohort before any work, not every case

    def record(self, model_name: str) -> dict:
        """What decides a row: a done case made with another record is redone (the device is not part of it; the
        rods file by its content, so corrected rod values redo the FE models)."""
        fe = self.fe and {**vars(self.fe), "formats": list(self.fe.formats), "calibration": self.fe_calibration,
                          "calibration_sha256": None if self.fe_calibration == "internal" else hashlib.sha256(
                              read_bytes(Path(self.fe_calibration), "Calibration file", MAX_CSV_BYTES)).hexdigest()}
        return {"model": model_name, "fill": self.fill, "truth_dir": str(self.truth_dir) if self.truth_dir else None,
                "surface": self.surface_format and {"format": self.surface_format, **vars(self.surface)},
                **({"fe": fe} if fe else {})}  # without --fe, the record of the folders made before --fe existed


@dataclass(frozen=True)
class BatchProgress:
    done: int  # cases of this shard finished (including the ones skipped as already done)
    total: int  # cases in this shard
    case: str
    fraction: float  # of the current case
    stage: str
    eta_s: float | None  # None until one case has been computed in this run


@dataclass(frozen=True)
class BatchSummary:
    total: int
    skipped: int
    computed: int
    errors: int
    results: Path
    report: Path


@dataclass
class CaseResult:
    """What one case produced; case_rows turns it into rows."""

    ct: sitk.Image
    label: sitk.Image
    femurs: tuple = ()  # inference.Femur per femur found (side, label value, checks)
    fill: sitk.Image | None = None
    truth: sitk.Image | None = None
    warnings: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)  # column -> path relative to the output folder
    fe: dict[str, dict[str, str]] = field(default_factory=dict)  # side -> its FE columns


# --- cases ----------------------------------------------------------------------------------------------------

def case_name(path: Path) -> str:
    """File name without the image extension and nnU-Net's channel suffix: ``F7L_fall_0000.nrrd`` -> ``F7L_fall``."""
    stem = path.name[: -len(image_suffix(path))]
    return re.sub(r"_0000$", "", stem)


def _check_name(name: str, where: str) -> str:
    """A case name its output files can carry: a plain file name, valid UTF-8, short enough for every suffix."""
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise FemurSegError(f"Case name '{shown(name)}' ({shown(where)}) cannot be a file name: no path separators, "
                            "no leading dot.")
    check_name(name, f"Case name ({shown(where)})")
    if len(name.encode("utf-8")) + LONGEST_CASE_SUFFIX > NAME_MAX_BYTES:
        raise FemurSegError(f"Case name '{name[:40]}...' ({shown(where)[:80]}) is {len(name.encode('utf-8'))} bytes: "
                            f"its files would pass the file system's {NAME_MAX_BYTES}-byte names; shorten it to "
                            f"{NAME_MAX_BYTES - LONGEST_CASE_SUFFIX} (CSV: 'case').")
    return name


def find_cases(source: str | os.PathLike) -> list[Case]:
    """The cases of a folder of CT files, or of a CSV with a ``ct`` column (optional ``case``), sorted by name.

    Relative paths in the CSV are relative to the CSV's folder. A listed file that is missing becomes an error row.
    """
    source = Path(source)
    if source.is_dir():
        files = [p for p in source.iterdir() if p.is_file() and not p.name.startswith(".")
                 and image_suffix(p) in CT_SUFFIXES]
        cases = [Case(_check_name(case_name(check_name(p, "CT file")), str(p)), p) for p in files]
        if not cases:
            raise FemurSegError(f"Folder '{source}' holds no CT images ({', '.join(CT_SUFFIXES)}).")
    elif source.is_file() and source.suffix.lower() == ".csv":
        try:
            text = read_bytes(source, "CSV", MAX_CSV_BYTES).decode("utf-8-sig")
            records = list(csv.DictReader(io.StringIO(text, newline="")))
        except (UnicodeDecodeError, csv.Error) as error:
            raise FemurSegError(f"Could not read the CSV '{source}': {error}.") from None
        if not records or "ct" not in records[0]:
            raise FemurSegError(f"CSV '{source}' needs a header row with a 'ct' column (and optionally 'case').")
        cases = []
        for number, record in enumerate(records, start=2):
            path = Path((record.get("ct") or "").strip())
            if not str(path) or str(path) == ".":
                raise FemurSegError(f"CSV '{source}' line {number} has no ct path.")
            path = path if path.is_absolute() else source.parent / path
            name = (record.get("case") or "").strip() or case_name(path)
            cases.append(Case(_check_name(name, f"CSV line {number}"), path))
    else:
        raise FemurSegError(f"Input '{source}' is neither a folder of CT images nor a .csv file listing them.")
    names = [case.name for case in cases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise FemurSegError(f"Several inputs give the case name(s) {', '.join(duplicates)}; rename them (CSV: 'case').")
    return sorted(cases, key=lambda case: case.name)


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` with 0 <= I < N: this run does the cases I, I+N, I+2N, ... of the sorted list."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise FemurSegError(f"--shard '{text}' must be I/N with 0 <= I < N, e.g. 0/4 "
                            "(SLURM: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-3).")
    return int(match.group(1)), int(match.group(2))


def shard(cases: list[Case], index: int, count: int) -> list[Case]:
    """Every count-th case from ``index``: the shards are disjoint and together hold every case."""
    return cases[index::count]


def find_truth(truth_dir: Path, name: str) -> Path | None:
    """The truth label ``<case>.<image extension>`` in ``truth_dir`` (nnU-Net's labelsTs naming), if any."""
    found = [truth_dir / f"{name}{suffix}" for suffix in IMAGE_SUFFIXES if (truth_dir / f"{name}{suffix}").is_file()]
    if len(found) > 1:
        raise FemurSegError(f"Several truth labels for '{name}' in '{truth_dir}': "
                            f"{', '.join(p.name for p in found)}; keep one.")
    return found[0] if found else None


# --- rows -----------------------------------------------------------------------------------------------------

def _number(value: float | None, digits: int) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def case_rows(case: Case, result: CaseResult, seconds: float, model: str) -> list[dict[str, str]]:
    """The one place that turns a case's result into its row(s): one per femur found (none found: one row)."""
    ct_hu = sitk.GetArrayViewFromImage(result.ct)
    label = sitk.GetArrayViewFromImage(result.label)
    voxel_ml = float(np.prod(result.label.GetSpacing())) / 1000.0
    femurs = [(femur.side, label == femur.value, list(femur.warnings)) for femur in result.femurs]
    rows = []
    for side, femur, femur_warnings in femurs or [("none", np.zeros(label.shape, dtype=bool), [])]:
        def agreement(other: sitk.Image | None) -> str:
            if other is None or not femur.any():
                return ""
            reference = sitk.GetArrayViewFromImage(other) != 0
            if len(femurs) > 1:  # a bilateral CT: compare within this femur's reach only
                reference = reference & ~np.logical_or.reduce([m for s, m, _ in femurs if s != side])
            return _number(dice(femur, reference), 4)

        rows.append({
            "case": case.name, "side": side, "status": "ok" if femurs else NO_FEMUR_STATUS,
            "volume_ml": _number(np.count_nonzero(femur) * voxel_ml, 3),
            "mean_hu": _number(float(ct_hu[femur].mean()) if femur.any() else None, 1),
            "fill_dice": agreement(result.fill), "truth_dice": agreement(result.truth),
            "warnings": "; ".join(result.warnings + femur_warnings), "error": "", "seconds": _number(seconds, 2),
            "finished": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "model": model,
            "ct": str(case.ct), **result.outputs, **result.fe.get(side, {}),
        })
    return rows


def error_rows(case: Case, message: str, seconds: float, model: str) -> list[dict[str, str]]:
    return [{"case": case.name, "status": "error", "error": message, "seconds": _number(seconds, 2),
             "finished": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "model": model,
             "ct": str(case.ct)}]


def _row_file(out_dir: Path, name: str) -> Path:
    return out_dir / FOLDERS["rows"] / f"{name}.json"


def _load_row_file(path: Path) -> dict | None:
    try:
        record = json.loads(read_bytes(path, "Row file", MAX_CSV_BYTES))  # a regular file: a FIFO would hang
    except (FemurSegError, ValueError):
        return None  # unreadable: the case is simply not done
    return record if isinstance(record, dict) and isinstance(record.get("rows"), list) else None


def is_done(out_dir: Path, case: Case, record: dict) -> bool:
    """Done = an ok row file made with the same settings."""
    stored = _load_row_file(_row_file(out_dir, case.name))
    return bool(stored and stored.get("settings") == record
                and all(row.get("status") in ("ok", NO_FEMUR_STATUS) for row in stored["rows"]))


def write_results(out_dir: Path, title: str) -> tuple[Path, Path]:
    """Rebuild results.csv and report.html from every row file, under a lock shared by all shards."""
    out_dir = Path(out_dir)
    with FileLock(out_dir / LOCK_FILE, timeout=LOCK_TIMEOUT_S):
        rows = []
        for path in sorted((out_dir / FOLDERS["rows"]).glob("*.json")):
            stored = _load_row_file(path)
            rows += stored["rows"] if stored else []
        rows.sort(key=lambda row: (row.get("case", ""), row.get("side", "")))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({column: row.get(column, "") for column in CSV_COLUMNS} for row in rows)
        write_bytes_atomic(out_dir / RESULTS_CSV, text.getvalue().encode())
        write_bytes_atomic(out_dir / REPORT_HTML, report_html(rows, title).encode())
    return out_dir / RESULTS_CSV, out_dir / REPORT_HTML


def report_html(rows: list[dict[str, str]], title: str) -> str:
    """One self-contained page: a summary, then every row with its overlay picture (linked files)."""
    ok = [row for row in rows if row.get("status") == "ok"]
    volumes = [float(row["volume_ml"]) for row in ok if row.get("volume_ml")]
    no_femur = sum(1 for row in rows if row.get("status") == NO_FEMUR_STATUS)
    summary = [f"{len({row.get('case') for row in rows})} cases, {len(ok)} ok rows, {no_femur} with no femur, "
               f"{len(rows) - len(ok) - no_femur} errors, {sum(1 for row in ok if row.get('warnings'))} with warnings"]
    if volumes:
        summary.append(f"femur volume {np.mean(volumes):.1f} ± {np.std(volumes):.1f} ml "
                       f"(range {min(volumes):.1f}-{max(volumes):.1f})")
    for column, what in (("truth_dice", "Dice vs truth"), ("fill_dice", "Dice vs fill")):
        values = [float(row[column]) for row in ok if row.get(column)]
        if values:
            summary.append(f"{what} {np.mean(values):.4f} mean, {min(values):.4f} min")
    seconds = [float(row["seconds"]) for row in rows if row.get("seconds")]
    if seconds:
        summary.append(f"{np.mean(seconds):.1f} s per case")
    with_fe = any(row.get("fe") for row in rows)
    shown = [c for c in CSV_COLUMNS if c not in ("ct", "label", "overlay", "surface", "model", "fe")
             and (with_fe or c not in FE_COLUMNS)]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["picture", *shown])
    body = []
    for row in rows:
        picture = row.get("overlay", "")
        link = (f'<a href="{quote(picture)}"><img src="{quote(picture)}" loading="lazy" alt="{html.escape(picture)}">'
                "</a>") if picture else ""
        cells = "".join(f"<td>{html.escape(row.get(c, ''))}</td>" for c in shown)
        failed = row.get("status") not in ("ok", NO_FEMUR_STATUS)
        css = ' class="error"' if failed else ' class="warn"' if row.get("warnings") else ""
        body.append(f"<tr{css}><td>{link}</td>{cells}</tr>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}} img{{width:360px}}
tr.error{{background:#fdd}} tr.warn{{background:#ffd}}</style></head><body>
<h1>{html.escape(title)}</h1>
<ul>{''.join(f'<li>{html.escape(line)}</li>' for line in summary)}</ul>
<p>Table: <a href="{RESULTS_CSV}">{RESULTS_CSV}</a>. Contours: nnU-Net red, fill blue, truth green.</p>
<table><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table></body></html>
"""


# --- the run ----------------------------------------------------------------------------------------------------

def _process_case(case: Case, segmenter: Segmenter, settings: BatchSettings, out_dir: Path,
                  report: Callable[[float, str], None]) -> CaseResult:
    from .fill import compute_fill
    from .report import overlay_png

    report(0.0, "reading")
    ct = read_ct(case.ct)
    segmentation = segmenter.run(ct, progress=lambda fraction, stage: report(0.85 * fraction, stage))
    label = segmentation.label
    suffix = _output_suffix(case.ct)
    per_femur = {warning for femur in segmentation.femurs for warning in femur.warnings}
    result = CaseResult(ct, label, femurs=segmentation.femurs,
                        warnings=[warning for warning in segmentation.warnings if warning not in per_femur])
    report(0.86, "writing")
    result.outputs["label"] = f"{FOLDERS['labels']}/{case.name}{suffix}"
    write_image(label, out_dir / result.outputs["label"])
    masks = {"nnU-Net": label}
    if settings.fill:
        report(0.88, "fill")
        result.fill = compute_fill(ct)
        write_image(result.fill, out_dir / FOLDERS["fill"] / f"{case.name}{suffix}")
        masks["fill"] = result.fill
    if settings.truth_dir is not None:
        try:  # a problem with the truth is the comparison's, not the segmentation's: a warning
            truth_path = find_truth(Path(settings.truth_dir), case.name)
            if truth_path is None:
                raise FemurSegError(f"no truth label '{case.name}.*' in the truth folder")
            truth = read_label(truth_path, "truth label")
            require_same_grid(ct, truth, "the CT", f"truth label '{truth_path.name}'")
            result.truth = masks["truth"] = truth
        except FemurSegError as error:
            result.warnings.append(str(error))
    report(0.93, "overlay")
    result.outputs["overlay"] = f"{FOLDERS['overlays']}/{case.name}.png"
    compare = ("truth", "nnU-Net") if result.truth is not None else ("nnU-Net", "fill") if settings.fill else None
    overlay_png(ct, masks, out_dir / result.outputs["overlay"], compare, title=case.name)
    if settings.surface_format and np.any(sitk.GetArrayViewFromImage(label)):
        report(0.96, "surface")
        result.outputs["surface"] = f"{FOLDERS['surfaces']}/{case.name}.{settings.surface_format}"
        check = write_label_surface(label, out_dir / result.outputs["surface"], settings.surface)
        result.warnings += check.problems()
    if settings.fe is not None:
        for femur in segmentation.femurs:  # a case with no femur gets no model
            report(0.97, f"FE model {femur.side}")
            result.fe[femur.side] = _fe_model(case, out_dir, result.outputs["label"], femur, settings,
                                              len(segmentation.femurs) > 1)
    return result


def _fe_folder(case: Case, side: str, bilateral: bool) -> str:
    """``fe/<case>``; with two femurs ``fe/<case>/<side>``."""
    return f"{FOLDERS['fe']}/{case.name}" + (f"/{side}" if bilateral else "")


def _fe_model(case: Case, out_dir: Path, label: str, femur: Femur, settings: BatchSettings,
              bilateral: bool) -> dict[str, str]:
    """One femur's FE model from the case's segmented label, exactly as ``femurseg fe`` makes it; its columns."""
    assert settings.fe is not None
    folder = _fe_folder(case, femur.side, bilateral)
    try:
        fe = run_fe(case.ct, out_dir / label, out_dir / folder, settings.fe_calibration,
                    dataclasses.replace(settings.fe, value=femur.value))
    except FemurSegError as error:
        raise FemurSegError(f"FE model ({femur.side}): {error}") from None
    return {"fe": folder, "fe_elements": str(len(fe.model.cells)), "fe_stiffness_n_mm": _number(fe.stiffness_n_mm, 1),
            "fe_warnings": "; ".join(fe.warnings)}


def _output_suffix(ct: Path) -> str:
    """A case's label and fill take the CT's format; .mhd (two files, not atomic) becomes .mha."""
    return ".mha" if image_suffix(ct) == ".mhd" else image_suffix(ct)


def planned_outputs(out_dir: Path, case: Case, settings: BatchSettings) -> list[Path]:
    """Every file a case writes, known before it runs."""
    suffix = _output_suffix(case.ct)
    paths = [out_dir / FOLDERS["labels"] / f"{case.name}{suffix}", out_dir / FOLDERS["overlays"] / f"{case.name}.png",
             _row_file(out_dir, case.name)]
    if settings.fill:
        paths.append(out_dir / FOLDERS["fill"] / f"{case.name}{suffix}")
    if settings.surface_format:
        paths.append(out_dir / FOLDERS["surfaces"] / f"{case.name}.{settings.surface_format}")
    if settings.fe is not None:  # one femur's; run_fe checks each model's files against its inputs again
        fe_dir = out_dir / _fe_folder(case, "", False)
        paths += [*output_files(fe_dir, settings.fe.formats).values(), fe_dir / f"{STEM}.json"]
    return paths


def check_outputs(source: str | os.PathLike, out_dir: Path, cases: list[Case], settings: BatchSettings) -> None:
    """Before any work (iopolicy): no folder batch writes lies in the CT folder or the truth folder, both read as a
    set, and no file it writes is one of the cases' CTs (a CSV may list CTs anywhere) or a truth label."""
    read_as_set = [Path(source)] if Path(source).is_dir() else []
    read_as_set += [Path(settings.truth_dir)] if settings.truth_dir is not None else []
    for folder in (out_dir, *(out_dir / name for name in FOLDERS.values())):
        check_against_inputs(folder, (), read_as_set, "Output folder")
    inputs = InputFiles(case.ct for case in cases)
    for path in (out_dir / RESULTS_CSV, out_dir / REPORT_HTML,
                 *(path for case in cases for path in planned_outputs(out_dir, case, settings))):
        check_against_inputs(path, inputs, (), "Output")


def run_batch(source: str | os.PathLike, out_dir: str | os.PathLike, settings: BatchSettings = BatchSettings(),
              shard_spec: tuple[int, int] = (0, 1),
              progress: Callable[[BatchProgress], None] | None = None) -> BatchSummary:
    """Segment every case of ``source`` (this shard's part) not yet done into ``out_dir``; see the module doc."""
    from .models import resolve_model

    out_dir = check_name(out_dir, "Output folder")
    cases = shard(find_cases(source), *shard_spec)
    check_outputs(source, out_dir, cases, settings)
    model = resolve_model(settings.model)
    record = settings.record(model.name)
    for folder in (out_dir, *(out_dir / name for name in FOLDERS.values())):
        prepare_output_folder(folder)
    title = f"FemurSeg batch: {Path(source).name} ({model.name})"
    show = progress or (lambda update: None)
    todo = [case for case in cases if not is_done(out_dir, case, record)]
    skipped, errors, spent = len(cases) - len(todo), 0, 0.0
    if todo:
        show(BatchProgress(skipped, len(cases), todo[0].name, 0.0, "loading model", None))
        segmenter = _load_segmenter(model.root, settings.device)
    for index, case in enumerate(todo):
        def report(fraction: float, stage: str, index: int = index, name: str = case.name) -> None:
            computed = index + (fraction >= 1.0)
            eta = spent / computed * (len(todo) - index - fraction) if computed else None
            show(BatchProgress(skipped + index, len(cases), name, fraction, stage, eta))

        started = time.perf_counter()
        try:
            result = _process_case(case, segmenter, settings, out_dir, report)
            rows = case_rows(case, result, time.perf_counter() - started, model.name)
        except FemurSegError as error:
            rows = error_rows(case, str(error), time.perf_counter() - started, model.name)
        except Exception as error:  # one bad case must not stop the cohort; its row says what happened
            rows = error_rows(case, f"unexpected {type(error).__name__}: {error}", time.perf_counter() - started,
                              model.name)
        errors += rows[0]["status"] == "error"
        write_bytes_atomic(_row_file(out_dir, case.name),
                           (json.dumps({"settings": record, "rows": rows}, indent=1) + "\n").encode())
        write_results(out_dir, title)
        spent += time.perf_counter() - started
        report(1.0, rows[0]["status"])
    results, page = write_results(out_dir, title)
    return BatchSummary(len(cases), skipped, len(todo), errors, results, page)


def _load_segmenter(model_root: Path, device: str) -> Segmenter:
    from .inference import InferenceOptions, Segmenter

    return Segmenter(model_root, InferenceOptions(device=device), notify=lambda message: print(message, file=sys.stderr))


def text_progress(stream: TextIO = sys.stderr) -> Callable[[BatchProgress], None]:
    """A progress bar with ETA on a terminal; one line per finished case in a log file (SLURM, Dask)."""
    live = stream.isatty()

    def show(update: BatchProgress) -> None:
        eta = "--:--" if update.eta_s is None else time.strftime("%H:%M:%S", time.gmtime(update.eta_s))
        finished = update.fraction >= 1.0
        overall = (update.done + min(update.fraction, 1.0)) / max(update.total, 1)
        filled = int(overall * 30)
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] {update.done + finished}/{update.total} "
                f"{update.case} {update.stage} ETA {eta}")
        if live:
            last = finished and update.done + 1 == update.total
            print(f"\r{line[:120]:120s}", end="\n" if last else "", file=stream, flush=True)
        elif finished:
            print(line, file=stream, flush=True)

    return show
