"""Cohort throughput and GUI latency, side by side in one run, as users run them (real child processes).

1. ``femurseg batch`` on N held-out phantoms (one process, the model loaded once; per case the label, an overlay
   PNG and the rows of results.csv and report.html) against one ``femurseg segment`` process per case (a shell
   loop), in cases per minute. The two alternate in halves (CLI, batch, CLI) so a load change on a shared machine
   hits both.
2. A GUI's Segment on the bundled sample: today's fresh process per Segment (``femurseg segment --progress-json``,
   what the panel and the browser started before the warm worker) against the warm worker's second and later
   Segments (``runner.SegmentationWorker``, timed from the request to the label read back, as the GUIs see it).

    python benchmarks/throughput_benchmark.py [--cases 10] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENVIRONMENT = dict(os.environ, PYTHONPATH=str(REPO))


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], cpu: list[float] | None = None) -> float:
    """Wall seconds of one child process; its CPU seconds are appended to ``cpu``."""
    started, cpu_before = time.perf_counter(), cpu_of_children()
    result = subprocess.run(command, capture_output=True, text=True, env=ENVIRONMENT, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    if cpu is not None:
        cpu.append(cpu_of_children() - cpu_before)
    return time.perf_counter() - started


def femurseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "FemurSegLib", *args]


def cohort(cases: int) -> dict:
    import SimpleITK as sitk

    from FemurSegLib.synthetic.phantom import generate_phantom

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        cts = []
        for seed in range(1, cases + 1):
            cts.append(folder / "cts" / f"phantom{seed:03d}.nrrd")
            cts[-1].parent.mkdir(exist_ok=True)
            sitk.WriteImage(generate_phantom(seed)[0], str(cts[-1]), True)
        half = len(cts) // 2
        cli_cpu: list[float] = []
        batch_cpu: list[float] = []
        cli = [timed(femurseg("segment", str(ct), str(folder / f"cli-{ct.name}"), "--device", "cpu"), cli_cpu)
               for ct in cts[:half]]
        batch_s = timed(femurseg("batch", str(folder / "cts"), str(folder / "batch"), "--device", "cpu"), batch_cpu)
        cli += [timed(femurseg("segment", str(ct), str(folder / f"cli-{ct.name}"), "--device", "cpu"), cli_cpu)
                for ct in cts[half:]]
        with open(folder / "batch" / "results.csv", newline="") as handle:
            per_case = [float(row["seconds"]) for row in csv.DictReader(handle)]
    return {"cases": cases, "cli_s": cli, "batch_s": batch_s, "batch_case_s": per_case,
            "cli_cpu_s": sum(cli_cpu), "batch_cpu_s": batch_cpu[0],
            "cli_cases_per_min": 60 * len(cli) / sum(cli), "batch_cases_per_min": 60 * cases / batch_s}


def gui(repeats: int) -> dict:
    from FemurSegLib.demo import SAMPLE_CT
    from FemurSegLib.imageio import read_image
    from FemurSegLib.runner import SegmentationWorker

    ct = read_image(SAMPLE_CT, "sample CT")
    with tempfile.TemporaryDirectory() as temporary:
        fresh = [timed(femurseg("segment", str(SAMPLE_CT), str(Path(temporary) / "femur.nrrd"), "--device", "cpu",
                                "--progress-json")) for _ in range(repeats)]
    worker = SegmentationWorker()
    segments = []
    try:
        for _ in range(repeats + 1):
            started = time.perf_counter()
            job = worker.segment(ct, device="cpu")
            while not job.poll().finished:
                time.sleep(0.02)
            if job.result() is None:
                raise SystemExit(f"warm worker failed: {job.state.error}")
            segments.append(time.perf_counter() - started)
    finally:
        worker.close()
    return {"fresh_process_s": fresh, "worker_first_s": segments[0], "worker_warm_s": segments[1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    throughput = cohort(args.cases)
    latency = gui(args.repeats)
    load_after = os.getloadavg()[0]

    print(f"{os.cpu_count()} CPU cores; load average {load_before:.1f} before, {load_after:.1f} after "
          "(other processes on the machine slow both sides alike)")
    print(f"cohort: {args.cases} held-out phantoms (seeds 1-{args.cases})")
    print(f"{'method':36s}{'total s':>9s}{'s/case':>9s}{'cases/min':>11s}{'CPU s/case':>12s}")
    cli_total = sum(throughput["cli_s"])
    print(f"{'femurseg segment, one call per case':36s}{cli_total:9.1f}{cli_total / args.cases:9.2f}"
          f"{throughput['cli_cases_per_min']:11.2f}{throughput['cli_cpu_s'] / args.cases:12.2f}")
    print(f"{'femurseg batch':36s}{throughput['batch_s']:9.1f}{throughput['batch_s'] / args.cases:9.2f}"
          f"{throughput['batch_cases_per_min']:11.2f}{throughput['batch_cpu_s'] / args.cases:12.2f}")
    ratio = throughput["batch_cases_per_min"] / throughput["cli_cases_per_min"]
    print(f"batch throughput: {ratio:.1f}x one CLI call per case in wall time, "
          f"{throughput['cli_cpu_s'] / throughput['batch_cpu_s']:.1f}x in CPU time "
          f"(batch per case after start-up: median {statistics.median(throughput['batch_case_s']):.2f} s)")
    print(f"GUI Segment on the sample ({args.repeats} repeats, median):")
    print(f"  fresh process per Segment (before):   {statistics.median(latency['fresh_process_s']):6.2f} s")
    print(f"  warm worker, first Segment:           {latency['worker_first_s']:6.2f} s")
    print(f"  warm worker, second and later:        {statistics.median(latency['worker_warm_s']):6.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"throughput": throughput, "latency": latency, "ratio": ratio,
                                         "load_average": [load_before, load_after]}, indent=2))


if __name__ == "__main__":
    main()
