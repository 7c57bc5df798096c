"""The ``femurseg`` command line: every sub-command is a thin call into FemurSegLib.

Errors the user can fix (FemurSegError) print as one line on stderr with exit code 2, never as a traceback,
and no output file is left behind (all writes are atomic).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import FemurSegError
from .training import add_recipe_arguments


def _cmd_phantom(args: argparse.Namespace) -> None:
    from .imageio import write_image
    from .phantom import generate_phantom

    ct, label, shape = generate_phantom(args.seed, args.side)
    write_image(ct, args.out_ct)
    write_image(label, args.out_label)
    print(f"phantom seed {args.seed}: {shape.side} femur, size {list(ct.GetSize())}, "
          f"neck-shaft angle {shape.neck_shaft_angle:.0f} deg -> {args.out_ct}, {args.out_label}")


def _fill_parameters(args: argparse.Namespace):
    from .fill import FillParameters

    try:
        return FillParameters(threshold_hu=args.threshold, closing_radius_mm=args.closing_mm,
                              max_ray_mm=args.max_ray_mm, max_open_directions=args.max_open)
    except ValueError as error:
        raise FemurSegError(f"Invalid fill parameter: {error}.") from None


def _cmd_fill(args: argparse.Namespace) -> None:
    from .fill import compute_fill
    from .imageio import read_image, write_image

    ct = read_image(args.ct, "CT")
    fill = compute_fill(ct, _fill_parameters(args))
    write_image(fill, args.out_label)
    print(f"fill ({args.threshold:g} HU) -> {args.out_label}")


def _cmd_compare(args: argparse.Namespace) -> None:
    from .imageio import read_image, write_bytes_atomic
    from .metrics import compare_images

    agreement = compare_images(read_image(args.reference, "reference"), read_image(args.other, "segmentation"))
    values = agreement.as_dict()
    for key, value in values.items():
        print(f"{key:22s} {value:.6f}")
    if args.json:
        write_bytes_atomic(args.json, (json.dumps(values, indent=2) + "\n").encode())


def _progress_printer(json_lines: bool):
    if json_lines:
        def report(fraction: float, stage: str) -> None:
            print(json.dumps({"progress": round(fraction, 4), "stage": stage}), flush=True)
        return report
    last = [-1]

    def bar(fraction: float, stage: str) -> None:
        filled = int(fraction * 30)
        if filled != last[0] or fraction >= 1.0:
            last[0] = filled
            end = "\n" if fraction >= 1.0 else ""
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction * 100:5.1f}% {stage:16s}", end=end,
                  file=sys.stderr, flush=True)
    return bar


def _cmd_segment(args: argparse.Namespace) -> None:
    from .imageio import read_image, write_image
    from .inference import InferenceOptions, Segmenter
    from .models import resolve_model

    ct = read_image(args.ct, "CT")
    model = resolve_model(args.model)
    notify = (lambda message: print(json.dumps({"message": message}), flush=True)) if args.progress_json \
        else (lambda message: print(message, file=sys.stderr))
    options = InferenceOptions(device=args.device, fast=args.fast, tile_step_size=args.tile_step,
                               whole_volume_tile=args.whole_volume)
    segmenter = Segmenter(model.root, options, notify=notify)
    label = segmenter.segment(ct, progress=_progress_printer(args.progress_json))
    write_image(label, args.out_label)
    if args.progress_json:
        print(json.dumps({"done": str(args.out_label)}), flush=True)
    else:
        print(f"{model.name}: femur -> {args.out_label}")


def _cmd_models(args: argparse.Namespace) -> None:
    from .models import install_model, list_models, remove_model

    if args.action == "list":
        for model in list_models():
            kind = "bundled" if model.bundled else "installed"
            print(f"{model.name:32s} {kind:9s} folds {','.join(model.folds):8s} {model.trained_folder}")
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

    result = export_case(args.ct, args.label, Path(args.dataset_dir), args.case, test=args.test, replace=args.replace)
    print(f"exported case '{result.case}' ({result.split}) into {result.dataset_dir}: "
          f"{result.image_path.name}, {result.label_path.name}; numTraining {result.num_training}")
    if result.replaced_dir:
        print(f"previous files of '{result.case}' kept in {result.replaced_dir}")


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
    from .imageio import read_image
    from .surface import write_label_surface

    check = write_label_surface(read_image(args.label, "label"), args.out_surface, _surface_options(args), args.value)
    print(f"surface -> {args.out_surface} ({args.coordinates}): {check.describe()}")
    for problem in check.problems():
        print(f"femurseg: warning: {problem}", file=sys.stderr)


def _cmd_batch(args: argparse.Namespace) -> None:
    import signal

    from .batch import BatchSettings, parse_shard, run_batch, text_progress

    settings = BatchSettings(model=args.model, device=args.device, fill=args.fill,
                             truth_dir=Path(args.truth_dir) if args.truth_dir else None,
                             surface_format=args.surface, surface=_surface_options(args))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="femurseg", description="Proximal femur segmentation in CT.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a synthetic proximal femur CT and its exact label")
    p.add_argument("out_ct"), p.add_argument("out_label")
    p.add_argument("--seed", type=int, default=1), p.add_argument("--side", choices=["left", "right"])
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("fill", help="the classic threshold-and-morphology fill segmentation")
    p.add_argument("ct"), p.add_argument("out_label")
    p.add_argument("--threshold", type=float, default=350.0, help="bone threshold in HU (default 350)")
    p.add_argument("--closing-mm", type=float, default=1.0)
    p.add_argument("--max-ray-mm", type=float, default=30.0)
    p.add_argument("--max-open", type=int, default=1, help="open ray directions (of 8) still counted as enclosed")
    p.set_defaults(func=_cmd_fill)

    p = sub.add_parser("compare", help="Dice, sensitivity, specificity, ASD, HD95 and volumes of two labels")
    p.add_argument("reference"), p.add_argument("other"), p.add_argument("--json")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("segment", help="segment a CT with an nnU-Net femur model")
    p.add_argument("ct"), p.add_argument("out_label")
    p.add_argument("--model", help="installed model name or model folder (default: the bundled model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="skip test-time mirroring (default on; --no-fast mirrors 8x slower)")
    p.add_argument("--tile-step", type=float, default=1.0,
                   help="nnU-Net's sliding-window step as a fraction of the patch (default 1.0: fewest tiles; "
                        "nnU-Net's own default 0.5 is ~1.5x slower and slightly more accurate)")
    p.add_argument("--whole-volume", action="store_true",
                   help="one tile over the whole volume (only for models trained on near-whole-volume patches)")
    p.add_argument("--progress-json", action="store_true", help="progress as JSON lines on stdout (for GUIs)")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("models", help="list, install or remove models")
    p.add_argument("action", choices=["list", "install", "remove"]), p.add_argument("target", nargs="?")
    p.add_argument("--name"), p.add_argument("--trust", action="store_true",
                                             help="allow checkpoints that need the full pickle loader")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("export", help="add a CT and its corrected label to an nnU-Net raw dataset")
    p.add_argument("ct"), p.add_argument("label"), p.add_argument("dataset_dir")
    p.add_argument("--case", required=True), p.add_argument("--test", action="store_true")
    p.add_argument("--replace", action="store_true")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="segment the bundled sample CT, run fill, compare and write a report")
    p.add_argument("--out", default="demo-output"), p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("web", help="serve FemurSeg in the browser (trame-slicer)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8080)
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
    try:
        args.func(args)
    except FemurSegError as error:
        print(f"femurseg: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("femurseg: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
