"""`make bench`: every benchmark in one run, each in its own process (the training benchmark must
configure logical devices before TensorFlow starts), then one combined report.

    python -m benchmarks.run_all --output-dir bench-output   # ~15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = ["bench_training", "bench_serving", "bench_rest", "bench_multiworker", "bench_quality",
              "bench_rate_distortion"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="bench-output")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run just these")
    args = parser.parse_args()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    failed = []
    for name in args.only or BENCHMARKS:
        print(f"\n=== {name} ===", flush=True)
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", "--output-dir", args.output_dir], env=env)
        if code:
            failed.append(name)
    out = Path(args.output_dir)
    combined = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem != "report"}
    (out / "report.json").write_text(json.dumps(combined, indent=2) + "\n")
    print(f"\nreport: {out / 'report.json'}" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
