"""The ``femurseg`` command line: every sub-command is a thin call into FemurSegLib.

Errors the user can fix (FemurSegError, and argparse's usage errors) print as one line on stderr with exit
code 2, never as a traceback, and no output file is left behind (all writes are atomic). Output paths are
checked before any work: a run that cannot write its result, or would overwrite its input, does not start.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from .errors import FemurSegError
from .iopolicy import DISK_FULL, shown
from .synthetic import CLINICAL_VIEWS
from .training import add_recipe_arguments


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors in FemurSeg's one-line form (argparse prints usage plus a line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"femurseg: error: {message} (see: {self.prog} --help)\n")


def _count(text: str) -> int:
    """A non-negative integer argument."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 1-65535")
    return value


def _cmd_phantom(args: argparse.Namespace) -> None:
    from .synthetic.cases import generate_case
    from .imageio import check_output_path, write_image

    check_output_path(args.out_ct, what="Output CT")
    check_output_path(args.out_label, (args.out_ct,), what="Output label")
    if args.view and args.family != "clinical":
        raise FemurSegError("--view applies to --family clinical only.")
    ct, label, info = generate_case(args.family, args.seed, held_out=args.held_out, view=args.view)
    write_image(ct, args.out_ct)
    write_image(label, args.out_label)
    spacing = " x ".join(f"{s:.2f}" for s in info.spacing)
    femurs = f"{' and '.join(info.sides)} femur" if info.sides else "no femur"
    print(f"{info.family} phantom seed {args.seed}: {femurs} ({', '.join(info.subjects)}), "
          f"size {list(info.size)}, spacing {spacing} mm -> {args.out_ct}, {args.out_label}")


def _fill_parameters(args: argparse.Namespace):
    from .fill import FillParameters

    try:
        return FillParameters(threshold_hu=args.threshold, closing_radius_mm=args.closing_mm,
                              max_ray_mm=args.max_ray_mm, max_open_directions=args.max_open)
    except ValueError as error:
        raise FemurSegError(f"Invalid fill parameter: {error}.") from None


def _cmd_fill(args: argparse.Namespace) -> None:
    from .budget import check_fill
    from .fill import compute_fill
    from .imageio import check_output_path, read_ct, write_image

    check_output_path(args.out_label, (args.ct,))
    parameters = _fill_parameters(args)
    ct = read_ct(args.ct, header_check=lambda size, spacing: check_fill(size, spacing, parameters.closing_radius_mm))
    fill = compute_fill(ct, parameters)
    write_image(fill, args.out_label)
    print(f"fill ({args.threshold:g} HU) -> {args.out_label}")


def _cmd_compare(args: argparse.Namespace) -> None:
    from .imageio import check_output_path, read_label, write_bytes_atomic
    from .metrics import compare_images

    if args.json:
        check_output_path(args.json, (args.reference, args.other), suffixes=(".json",), what="JSON output")
    agreement = compare_images(read_label(args.reference, "reference"), read_label(args.other, "segmentation"))
    values = agreement.as_dict()
    for key, value in values.items():
        print(f"{key:22s} {value:.6f}")
    if args.json:
        write_bytes_atomic(args.json, (json.dumps(values, indent=2) + "\n").encode())


def _progress_printer(json_lines: bool):
    """Progress as JSON lines on stdout (for GUIs) or a bar on stderr. The streams are bound now: nnU-Net's own
    prints may be redirected to a log meanwhile."""
    stdout, stderr = sys.stdout, sys.stderr
    if json_lines:
        def report(fraction: float, stage: str) -> None:
            print(json.dumps({"progress": round(fraction, 4), "stage": stage}), file=stdout, flush=True)
        return report
    last = [-1, ""]

    def bar(fraction: float, stage: str) -> None:
        filled = int(fraction * 30)
        if filled != last[0] or stage != last[1] or fraction >= 1.0:
            last[0], last[1] = filled, stage
            end = "\n" if fraction >= 1.0 else ""
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction * 100:5.1f}% {stage:26s}", end=end,
                  file=stderr, flush=True)
    return bar


def _notifier(json_lines: bool):
    """Messages for the user: JSON lines on stdout for GUIs, else lines on stderr (bound now, as above)."""
    stdout, stderr = sys.stdout, sys.stderr
    if json_lines:
        return lambda message: print(json.dumps({"message": message}), file=stdout, flush=True)
    return lambda message: print(f"\r{message:<70}", file=stderr, flush=True)  # over a progress bar, if any


def _cmd_segment(args: argparse.Namespace) -> None:
    from .imageio import check_output_path, read_ct, write_image
    from .inference import InferenceOptions, Segmenter
    from .models import resolve_model

    check_output_path(args.out_label, (args.ct,))
    ct = read_ct(args.ct)
    model = resolve_model(args.model)
    notify = _notifier(args.progress_json)
    options = InferenceOptions(device=args.device, fast=args.fast, tile_step_size=args.tile_step,
                               whole_volume_tile=args.whole_volume, side=args.side)
    segmenter = Segmenter(model.root, options, notify=notify)
    result = segmenter.run(ct, progress=_progress_printer(args.progress_json))
    write_image(result.label, args.out_label)
    femurs = [{"side": f.side, "value": f.value, "volume_ml": round(f.volume_ml, 1)} for f in result.femurs]
    if args.progress_json:
        print(json.dumps({"femurs": femurs, "warnings": list(result.warnings)}), flush=True)
        print(json.dumps({"done": str(args.out_label)}), flush=True)
        return
    for warning in result.warnings:
        print(f"femurseg: warning: {warning}", file=sys.stderr)
    found = ", ".join(f"{f['side']} = {f['value']} ({f['volume_ml']:.0f} ml)" for f in femurs) or "no femur"
    print(f"{model.name}: {found} -> {args.out_label}")


def _cmd_models(args: argparse.Namespace) -> None:
    from .finetune import summary
    from .models import install_model, remove_model, scan_models

    if args.action == "list":
        models, problems = scan_models()
        for problem in problems:
            print(f"femurseg: warning: {problem}", file=sys.stderr)
        for model in models:
            kind = "bundled" if model.bundled else "installed"
            print(f"{model.name:32s} {kind:9s} folds {','.join(model.folds):8s} {model.trained_folder}")
            if summary(model.card):
                print(f"{'':32s} fine-tuned from {model.card.get('base_model', {}).get('name', '?')}: "
                      f"{summary(model.card)}")
    elif args.action == "install":
        if not args.target:
            raise FemurSegError("Give the model zip or folder to install: femurseg models install PATH")
        model = install_model(Path(args.target), name=args.name, trust_pickle=args.trust)
        print(f"installed {model.name} -> {model.root}")
    else:
        if not args.target:
            raise FemurSegError("Give the name of the model to remove: femurseg models remove NAME")
        print(f"removed {remove_model(args.target)}")


def _cmd_export(args: argparse.Namespace) -> None:
    from .dataset import export_case

    result = export_case(args.ct, args.label, Path(args.dataset_dir), args.case, test=args.test, replace=args.replace,
                         force=args.force)
    for path in result.recovered:
        print(f"recovered from an interrupted export: {path}")
    print(f"exported case '{result.case}' ({result.split}) into {result.dataset_dir}: "
          f"{result.image_path.name}, {result.label_path.name}; numTraining {result.num_training}")
    if result.replaced_dir:
        print(f"previous files of '{result.case}' kept in {result.replaced_dir}")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from .finetune import finetune, plan_finetune, summary

    job = plan_finetune(Path(args.dataset_dir), base=args.base, name=args.name, epochs=args.epochs,
                        minutes=args.minutes, iterations=args.iterations)
    result = finetune(job, device=args.device, progress=_progress_printer(args.progress_json),
                      notify=_notifier(args.progress_json))
    if args.progress_json:
        print(json.dumps({"done": result.model.name, "model": str(result.model.root),
                          "summary": summary(result.card)}), flush=True)
    else:
        print(f"installed {result.model.name} -> {result.model.root}: {summary(result.card)}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), device=args.device)


def _cmd_web(args: argparse.Namespace) -> None:
    from .web.server import serve

    serve(host=args.host, port=args.port, datasets_root=Path(args.datasets_root) if args.datasets_root else None,
          open_browser=False)


def _cmd_train(args: argparse.Namespace) -> None:
    from .training import run_recipe

    run_recipe(args)


def _surface_options(args: argparse.Namespace):
    from .surface import SurfaceOptions

    return SurfaceOptions(smoothing=args.smoothing, decimate=args.decimate, coordinates=args.coordinates)


def _cmd_surface(args: argparse.Namespace) -> None:
    from .imageio import check_output_path, read_label
    from .surface import surface_format, write_label_surface

    check_output_path(args.out_surface, (args.label,), suffixes=None, what="Surface file")
    surface_format(args.out_surface)
    options = _surface_options(args)
    check = write_label_surface(read_label(args.label), args.out_surface, options, args.value)
    print(f"surface -> {args.out_surface} ({args.coordinates}): {check.describe()}")
    for problem in check.problems():
        print(f"femurseg: warning: {problem}", file=sys.stderr)


def _fe_options(args: argparse.Namespace, value: int | None = None):
    """FEOptions from the ``fe`` options that ``fe`` and ``batch --fe`` share (_add_fe_arguments)."""
    from .fe.pipeline import FEOptions

    formats = tuple(f.strip().lower() for f in args.fe_formats.split(",") if f.strip())
    return FEOptions(element_size=args.fe_element_size, quadratic=args.fe_quadratic, law=args.fe_law,
                     bins=args.fe_bins, formats=formats, value=value, solve=args.fe_solve)


def _cmd_fe(args: argparse.Namespace) -> None:
    import numpy as np

    from .fe.pipeline import run_fe

    options = _fe_options(args, args.value)
    notify = _notifier(args.progress_json) if args.progress_json else print
    result = run_fe(args.ct, args.label, args.out_dir, args.fe_calibration, options, notify=notify,
                    progress=_progress_printer(args.progress_json) if args.progress_json else None)
    if args.progress_json:
        print(json.dumps({"done": str(args.out_dir), "elements": len(result.model.cells),
                          "stiffness_n_mm": result.stiffness_n_mm, "warnings": list(result.warnings),
                          "files": {kind: str(path) for kind, path in result.files.items()}}), flush=True)
        return
    for warning in result.warnings:
        print(f"femurseg: warning: {warning}", file=sys.stderr)
    moduli = result.model.modulus_mpa
    print(f"E {moduli.min():.0f}-{moduli.max():.0f} MPa (median {float(np.median(moduli)):.0f}) in "
          f"{result.model.bins.count} material bins ({args.fe_law})")
    if result.stiffness_n_mm is not None:
        print(f"stance stiffness (distal end fixed, head pushed along the shaft): {result.stiffness_n_mm:.0f} N/mm")
    print(f"-> {', '.join(str(path) for path in result.files.values())}")


def _cmd_batch(args: argparse.Namespace) -> None:
    from .batch import BatchSettings, parse_shard, run_batch, text_progress

    settings = BatchSettings(model=args.model, device=args.device, fill=args.fill,
                             truth_dir=Path(args.truth_dir) if args.truth_dir else None,
                             surface_format=args.surface, surface=_surface_options(args),
                             fe=_fe_options(args) if args.fe else None, fe_calibration=args.fe_calibration)
    shard = parse_shard(args.shard)

    def stop(_signal, _frame):  # SLURM's scancel and time limit send SIGTERM: end like Ctrl-C, cleanly
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        summary = run_batch(args.input, args.out_dir, settings, shard, text_progress(sys.stderr))
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{summary.total} cases ({summary.skipped} already done, {summary.computed} computed, "
          f"{summary.errors} failed) -> {summary.results}, {summary.report}")


def _cmd_worker(args: argparse.Namespace) -> None:
    from .worker import serve

    serve(args.model, args.device, args.fast)


def _add_surface_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoothing", type=float, default=0.5,
                   help="windowed-sinc smoothing factor in [0, 1], as Slicer's closed surfaces (default 0.5; 0 = none)")
    p.add_argument("--decimate", type=float, default=0.0,
                   help="fraction of triangles to remove by quadric decimation, in [0, 1) (default 0)")
    p.add_argument("--coordinates", choices=["LPS", "RAS"], default="LPS",
                   help="LPS (default): the image file's patient coordinates, as Slicer's own model export; "
                        "RAS: the coordinates Slicer displays")


def _add_fe_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The FE model's options, for ``fe`` and (named ``--fe-...``) for ``batch --fe``."""
    def add(name: str, **options) -> None:
        p.add_argument(f"--{prefix}{name}", dest=f"fe_{name.replace('-', '_')}", **options)

    add("calibration", default="internal",
        help="rods.csv (columns density_mg_cm3, hu; optional name, material HA|K2HPO4) or rods.json, or 'internal' "
             "(default: air, fat, muscle and cortex of the scan, nominal densities)")
    add("law", choices=["morgan", "keyak", "keller"], default="morgan",
        help="density-modulus law (default morgan: Schileo 2008 + Morgan 2003; keyak: K2HPO4 piecewise; "
             "keller: 10500 rho_ash^2.29)")
    add("element-size", type=float, default=2.0, help="target tetrahedron edge in mm (default 2; ~1 for ex-vivo QCT)")
    add("quadratic", action="store_true", help="10-node tetrahedra (C3D10, SOLID187, tet10)")
    add("formats", default="inp,feb,cdb,vtu", help="comma-separated, of inp, feb, cdb, vtu (default all)")
    add("bins", type=int, default=100,
        help="material bins for .inp and .cdb (default 100; .feb and .vtu keep every element's E)")
    add("solve", action=argparse.BooleanOptionalAction, default=True,
        help="solve the stance case as a check and report the stiffness (default on)")


def build_parser() -> argparse.ArgumentParser:
    from .finetune import DEFAULT_MINUTES, ITERATIONS_PER_EPOCH
    from .inference import DEVICES

    parser = _Parser(prog="femurseg", description="Proximal femur segmentation in CT.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    volume = "(.nrrd, .nii.gz, .nii or .mha)"

    p = sub.add_parser("phantom", help="write a synthetic proximal femur CT and its exact label")
    p.add_argument("out_ct", help=f"CT to write {volume}")
    p.add_argument("out_label", help=f"exact femur label to write {volume}")
    p.add_argument("--family", choices=["legacy", "exvivo", "invivo", "clinical"], default="legacy",
                   help="legacy: SDF phantom (the sample's kind); exvivo: real femur shape, potted, any pose; "
                        "invivo: clinical hip CT with both femurs and the pelvis; clinical: pelvis, abdomen or leg "
                        "CT with spine, sacrum, organs and knees, femurs in view or none")
    p.add_argument("--view", choices=CLINICAL_VIEWS,
                   help="clinical family: the kind of field of view (spine and legs hold no femur); default drawn")
    p.add_argument("--seed", type=_count, default=1, help="phantom number; the same seed gives the same volume")
    p.add_argument("--held-out", action="store_true",
                   help="use held-out subjects' shapes (never used for training; for testing a model)")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("fill", help="the classic threshold-and-morphology fill segmentation")
    p.add_argument("ct", help=f"CT in HU {volume}")
    p.add_argument("out_label", help=f"fill label to write {volume}")
    p.add_argument("--threshold", type=float, default=350.0, help="bone threshold in HU, -1000 to 3000 (default 350)")
    p.add_argument("--closing-mm", type=float, default=1.0,
                   help="radius of the closing that bridges cortical gaps, 0 to 5 mm (default 1)")
    p.add_argument("--max-ray-mm", type=float, default=30.0,
                   help="how far the enclosure rays look for bone, up to 100 mm (default 30)")
    p.add_argument("--max-open", type=int, default=1,
                   help="open ray directions (of 8) still counted as enclosed, 0 to 7 (default 1)")
    p.set_defaults(func=_cmd_fill)

    p = sub.add_parser("compare", help="Dice, sensitivity, specificity, ASD, HD95 and volumes of two labels")
    p.add_argument("reference", help="reference label (non-zero = femur), e.g. the truth or the corrected label")
    p.add_argument("other", help="label to compare with it, on the same voxel grid")
    p.add_argument("--json", help="also write the numbers to this .json file")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("segment", help="segment a CT with an nnU-Net femur model")
    p.add_argument("ct", help=f"CT in HU {volume}")
    p.add_argument("out_label", help=f"femur label to write {volume}")
    p.add_argument("--model", help="installed model name or model folder (default: the bundled model)")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where to run: auto (GPU if any, else CPU), cpu, cuda or mps (default auto)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="skip test-time mirroring (default on; --no-fast mirrors 8x slower)")
    p.add_argument("--tile-step", type=float, default=1.0,
                   help="nnU-Net's sliding-window step as a fraction of the patch, in (0, 1] (default 1.0: fewest "
                        "tiles; nnU-Net's own default 0.5 is ~1.5x slower and slightly more accurate)")
    p.add_argument("--whole-volume", action="store_true",
                   help="one tile over the whole volume (only for models trained on near-whole-volume patches)")
    p.add_argument("--side", choices=["both", "left", "right"], default="both",
                   help="which femur(s) to write: both (default; left = 1, right = 2, a single femur whose side "
                        "cannot be told = 1) or one side only (written as 1)")
    p.add_argument("--progress-json", action="store_true", help="progress as JSON lines on stdout (for GUIs)")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("models", help="list, install or remove models")
    p.add_argument("action", choices=["list", "install", "remove"], help="what to do")
    p.add_argument("target", nargs="?", help="install: a model zip (nnUNetv2_export_model_to_zip) or folder; "
                                             "remove: the installed model's name")
    p.add_argument("--name", help="install under this name (default: the zip or folder name)")
    p.add_argument("--trust", action="store_true",
                   help="install checkpoints that need Python's full pickle loader, which can run code hidden in "
                        "them: only for models from a source you trust")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("export", help="add a CT and its corrected label to an nnU-Net raw dataset")
    p.add_argument("ct", help=f"CT in HU {volume}")
    p.add_argument("label", help="its corrected femur label (0 = background, one value = femur), on the CT's grid")
    p.add_argument("dataset_dir", help="dataset folder .../nnUNet_raw/DatasetNNN_Name (created if missing)")
    p.add_argument("--case", required=True, help="case name: letters, digits, '_' and '-', e.g. F7L_fall")
    p.add_argument("--test", action="store_true", help="add it as a test case (imagesTs/labelsTs)")
    p.add_argument("--replace", action="store_true",
                   help="replace an existing case of that name (its old files go to femurseg/replaced/)")
    p.add_argument("--force", action="store_true",
                   help="export a label that is empty or covers most of the volume (refused otherwise)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("finetune", help="fine-tune a model on an exported dataset; installs the result as a new model")
    p.add_argument("dataset_dir", help="the nnU-Net dataset Export writes to (.../DatasetNNN_Name): imagesTr/labelsTr "
                                       "train, imagesTs/labelsTs (or a held-out 20 %% of imagesTr) validate")
    p.add_argument("--from", dest="base", metavar="MODEL",
                   help="model to start from: installed name or folder (default: the bundled model)")
    p.add_argument("--name", help="name of the new model (default: BASE-DATASETNAME); existing models are never "
                                  "overwritten")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=_count, help="train this many epochs of --iterations iterations")
    budget.add_argument("--minutes", type=float,
                        help=f"time budget of the whole job in minutes (default {DEFAULT_MINUTES:g}); training "
                             "stops in time to validate and install")
    p.add_argument("--iterations", type=_count, default=ITERATIONS_PER_EPOCH,
                   help=f"training iterations per epoch (default {ITERATIONS_PER_EPOCH})")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where to train: auto (GPU if any, else CPU), cpu, cuda or mps (default auto)")
    p.add_argument("--progress-json", action="store_true", help="progress as JSON lines on stdout (for GUIs)")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("demo", help="segment the bundled sample CT, run fill, compare and write a report")
    p.add_argument("--out", default="demo-output",
                   help="folder for labels, metrics.json and PNGs (default demo-output)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to run nnU-Net (default auto)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("web", help="serve FemurSeg in the browser (trame-slicer)",
                       epilog="environment: FEMURSEG_WEB_OPEN_ROOTS = more folders (os.pathsep-separated) whose files "
                              "the page may open by path, besides the datasets root and the sample data; "
                              "FEMURSEG_WEB_MAX_UPLOAD_MB = the upload limit (default 512).")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=_port, default=8080, help="port to serve on (default 8080)")
    p.add_argument("--datasets-root", help="exports are confined to this folder (default ~/FemurSeg-datasets)")
    p.set_defaults(func=_cmd_web)

    p = sub.add_parser("surface", help="watertight surface of a label (STL, VTK, VTP, OBJ) for finite-element meshing",
                       description="Surface of the label's non-zero voxels (or of --value) in the label's physical "
                                   "coordinates, in millimetres. Files are in LPS unless --coordinates RAS, and say "
                                   "so in their header (SPACE=LPS) as Slicer's exports do.")
    p.add_argument("label", help="label image (.nrrd, .nii.gz, .mha ...): non-zero voxels are the shape")
    p.add_argument("out_surface", help="OUT.stl, .vtk, .vtp or .obj (the writer follows the extension)")
    p.add_argument("--value", type=int, help="only voxels with this label value (default: every non-zero voxel)")
    _add_surface_arguments(p)
    p.set_defaults(func=_cmd_surface)

    p = sub.add_parser("fe", help="finite-element model of a femur label: tetrahedra, calibrated density and moduli; "
                                  "Abaqus .inp, FEBio .feb, Ansys .cdb, VTK .vtu",
                       description="Meshes the label with tetrahedra (pytetwild), maps each element's density and "
                                   "Young's modulus from the CT (integrated over the element), names the load-case "
                                   "node sets, checks that the stance case solves, and writes OUT_DIR/femur.<format> "
                                   "and femur.json (provenance). Units mm, N, MPa; LPS coordinates.")
    p.add_argument("ct", help=f"CT in HU {volume}")
    p.add_argument("label", help="the corrected femur label, on the CT's grid, one solid piece")
    p.add_argument("out_dir", help="output folder (created)")
    _add_fe_arguments(p)
    p.add_argument("--value", type=int, help="label value of the femur to mesh (for a label with both femurs)")
    p.add_argument("--progress-json", action="store_true", help="progress as JSON lines on stdout (for GUIs)")
    p.set_defaults(func=_cmd_fe)

    p = sub.add_parser("batch", help="segment a folder or CSV of CTs with one loaded model; results.csv and a report",
                       description="Per case: the label, an overlay PNG and a row in OUT_DIR/results.csv, plus "
                                   "OUT_DIR/report.html. Resumable: done cases are skipped; Ctrl-C leaves no "
                                   "half-written file. A case that fails gets an error row.")
    p.add_argument("input", help="folder of CT images, or a CSV with a 'ct' column (optional 'case')")
    p.add_argument("out_dir", help="output folder (created; a re-run into it does only the cases not done)")
    p.add_argument("--model", help="installed model name or model folder (default: the bundled model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto uses a CUDA or Apple GPU when PyTorch sees one, else the CPU")
    p.add_argument("--fill", action="store_true", help="also run the fill baseline; its Dice with nnU-Net per case")
    p.add_argument("--truth-dir", help="folder of truth labels named <case>.nrrd / .nii.gz ...: Dice vs truth")
    p.add_argument("--shard", default="0/1", help="I/N: this run does every N-th case from the I-th (0 <= I < N), "
                                                  "for SLURM job arrays and Dask maps")
    p.add_argument("--surface", choices=["stl", "vtk", "vtp", "obj"], help="also write each femur's surface")
    _add_surface_arguments(p)
    p.add_argument("--fe", action="store_true",
                   help="also write each femur's FE model into OUT_DIR/fe/<case>/ (<case>/<side>/ with two femurs), as "
                        "'femurseg fe' does, with the --fe-... options below")
    _add_fe_arguments(p, "fe-")
    p.set_defaults(func=_cmd_batch)

    p = sub.add_parser("worker", help="(for GUIs) keep a model loaded and segment JSON requests from stdin")
    p.add_argument("--model", help="installed model name or model folder (default: the bundled model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="as for segment")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True, help="as for segment")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("train-bundled", help="re-run the bundled model's training recipe (about 2 h 45 min on 2 CPU cores)")
    add_recipe_arguments(p)
    p.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C and the GUIs' Cancel (SIGINT) stop long work cleanly even in a process started with SIGINT ignored,
        # as a non-interactive shell starts its background jobs
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        args.func(args)
    except FemurSegError as error:
        print(f"femurseg: error: {error}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"femurseg: error: out of memory in '{args.command}'; use a smaller or cropped volume, or a machine "
              "with more memory.", file=sys.stderr)
        return 2
    except OSError as error:  # the environment, not a bug: a full disk, a port in use, a file vanished mid-run
        where = f" ('{shown(error.filename)}')" if error.filename else ""
        print(f"femurseg: error: {args.command} failed: {error.strerror or error}{where}; "
              f"{'free some space and run it again' if error.errno in DISK_FULL else 'fix that and run it again'}.",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("femurseg: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
