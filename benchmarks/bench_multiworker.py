"""Multi-worker training: images/s of 1 process vs 2 local workers on the same global batch,
and how long a restarted job takes to resume.

    python -m benchmarks.bench_multiworker        # or: make bench

On 2 shared cores two workers do not add compute: this measures MultiWorkerMirroredStrategy's
overhead (collectives over loopback gRPC), not a speed-up. On real hosts each worker brings its
own GPUs and the same code scales out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import tensorflow as tf

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
STEPS_LINE = re.compile(r"(\d+) examples, (\d+) steps/epoch")


def timed_train(args: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "aekit_cli", "train", *args], capture_output=True, text=True,
                            env=ENV, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"aekit train {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - started, result.stdout


def throughput(out: Path, workers: int, epochs: int, batch: int) -> dict:
    common = ["--model", "dense", "--epochs", str(epochs), "--batch-size", str(batch), "--no-export",
              "--workdir", str(out / f"w{workers}")]
    warm = ["--multiworker-local", str(workers)] if workers > 1 else []
    seconds, stdout = timed_train(warm + common)
    examples, steps = map(int, STEPS_LINE.search(stdout).groups())
    return {"workers": workers, "seconds_total": seconds, "images_per_second": epochs * steps * batch / seconds}


def resume_time(out: Path) -> dict:
    """SIGTERM a 2-worker job after its first checkpoint, rerun it, and time the rerun's start."""
    workdir = out / "resume"
    args = [sys.executable, "-m", "aekit_cli", "train", "--multiworker-local", "2", "--model", "dense",
            "--epochs", "3", "--checkpoint-every-steps", "10", "--no-export", "--workdir", str(workdir)]
    job = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not tf.train.latest_checkpoint(str(workdir / "checkpoints")):
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    job.wait(120)
    started = time.perf_counter()
    rerun = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    resumed_at = first_epoch_at = None
    for line in rerun.stdout:
        if "resuming at step" in line and resumed_at is None:
            resumed_at = time.perf_counter() - started
        if "] epoch " in line and first_epoch_at is None:
            first_epoch_at = time.perf_counter() - started
    rerun.wait()
    return {"seconds_until_restored": resumed_at, "seconds_until_first_epoch_done": first_epoch_at,
            "rerun_exit_code": rerun.returncode}


def run(output_dir: str = "bench-output", epochs: int = 2, batch: int = 64) -> dict:
    out = Path(output_dir) / "multiworker"
    one, two = throughput(out, 1, epochs, batch), throughput(out, 2, epochs, batch)
    report = {"one_process": one, "two_local_workers": two,
              "two_vs_one": two["images_per_second"] / one["images_per_second"], "resume": resume_time(out),
              "note": "2 workers on 2 shared cores: this is MultiWorkerMirroredStrategy's overhead, not a speed-up; "
                      "times include process start-up and TensorFlow import"}
    print(f"multi-worker (dense, global batch {batch}, {epochs} epochs, wall time incl. start-up):")
    print(f"  1 process        {one['images_per_second']:8.0f} images/s")
    print(f"  2 local workers  {two['images_per_second']:8.0f} images/s  (ratio {report['two_vs_one']:.2f})")
    print(f"  restarted job: checkpoint restored after {report['resume']['seconds_until_restored']:.1f}s, "
          f"first epoch done after {report['resume']['seconds_until_first_epoch_done']:.1f}s")
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "multiworker.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="bench-output")
    args = parser.parse_args()
    run(args.output_dir)
