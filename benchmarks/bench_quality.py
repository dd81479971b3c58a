"""Model quality bars, measured with `aekit train` and `aekit evaluate` as a user would run them:

    python -m benchmarks.bench_quality            # or: make bench
    # conv, 10 epochs, defaults: test MSE (goal <= 0.005)
    # conv, 10 epochs, --noise-factor 0.4: denoised PSNR - noisy PSNR (goal >= 8 dB)
    # conv, 10 epochs, 2 logical devices: MSE within 10 % of one device
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def aekit(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "aekit_cli", *args], capture_output=True, text=True, env=ENV,
                            timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"aekit {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def train_and_evaluate(out: Path, name: str, *flags: str, noise: float = 0.0) -> dict:
    base = out / name / "models"
    aekit("train", "--model", "conv", "--epochs", "10", "--workdir", str(out / name / "run"),
          "--model-base-path", str(base), *flags)
    return json.loads(aekit("evaluate", "--model-base-path", str(base), "--noise-factor", str(noise),
                            "--json").strip().splitlines()[-1])


def run(output_dir: str = "bench-output") -> dict:
    out = Path(output_dir) / "quality"
    one = train_and_evaluate(out, "one_device")
    two = train_and_evaluate(out, "two_devices", "--num-logical-devices", "2")
    noisy = train_and_evaluate(out, "denoising", "--noise-factor", "0.4", noise=0.4)
    report = {"conv_mse": one["mse"], "conv_mse_2_logical_devices": two["mse"],
              "two_vs_one_mse_ratio": two["mse"] / one["mse"], "denoise_gain_db": noisy["denoise_gain_db"],
              "denoising_run": noisy}
    print("quality (conv, mnist-sample, 10 epochs):")
    print(f"  test MSE, 1 device            {one['mse']:.5f}  (goal <= 0.005)")
    print(f"  test MSE, 2 logical devices   {two['mse']:.5f}  (ratio {report['two_vs_one_mse_ratio']:.3f}, goal within 10 %)")
    print(f"  denoising gain, noise 0.4     {noisy['denoise_gain_db']:.2f} dB  (goal >= 8)")
    (Path(output_dir) / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="bench-output")
    run(parser.parse_args().output_dir)
