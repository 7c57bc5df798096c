"""FE benchmark (issue 26): the bundled sample's proximal femur meshed at 2 mm, mapped and written in every format.

Prints the wall time of each step, the mesh's figures and the peak memory (resident set) of the process. Target:
mesh + map + write <= 30 s on the 2-core CPU (py_bonemat ~110 s a model, Bonemat 5-20 s, published figures); the
stiffness solve, a check, is timed apart.

    python benchmarks/fe_benchmark.py [--element-size 2] [--out fe-benchmark-output]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from FemurSegLib.fe.pipeline import FEOptions, run_fe  # noqa: E402

SAMPLE = REPO / "Resources" / "SampleData"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--element-size", type=float, default=2.0)
    parser.add_argument("--out", help="output folder (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fe-benchmark-"))
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = run_fe(SAMPLE / "FemurPhantom05.nrrd", SAMPLE / "FemurPhantom05-label.nrrd", out, "internal",
                    FEOptions(element_size=args.element_size))
    total = time.perf_counter() - start
    seconds = result.seconds
    work = seconds["mesh"] + seconds["map"] + seconds["write"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{os.cpu_count()} CPU cores; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"sample FemurPhantom05 at {args.element_size:g} mm: {result.mesh.describe()}")
    print(f"mesh {seconds['mesh']:.1f} s, map {seconds['map']:.1f} s, write inp+feb+cdb+vtu {seconds['write']:.1f} s: "
          f"{work:.1f} s (target <= 30 s); stiffness solve {seconds.get('solve', 0.0):.1f} s; total {total:.1f} s")
    print(f"stance stiffness {result.stiffness_n_mm:.0f} N/mm; peak memory {peak_mb:.0f} MB")
    print("files: " + ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in result.files.values()))


if __name__ == "__main__":
    main()
