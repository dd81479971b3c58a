"""`aekit`: one command line for the whole kit. Each subcommand parses flags and calls one function.

    aekit train --dataset mnist-sample --model conv --epochs 10 --num-logical-devices 2
    aekit export --workdir runs/ae --model-base-path models/autoencoder
    aekit data convert --dataset ./images --output gs://bucket/data/images --shards 32
    aekit evaluate --model-base-path models/autoencoder --dataset mnist-sample --json
    aekit compress --model-base-path models/autoencoder --dataset mnist-sample --split test --output test.aec
    aekit decompress --model-base-path models/autoencoder --input test.aec --output test.npz
    aekit serve --port=8500 --rest_api_port=8501 --model_name=autoencoder --model_base_path=$PWD/models/autoencoder
    aekit client denoise --server localhost:8500 --model autoencoder --input x.npy --output y.npy
    aekit plot --workdir runs/ae --output-dir figures
    aekit loadtest --server localhost:8500 --model autoencoder --concurrency 16 --requests 2000
    aekit release --config models.config --model autoencoder --label canary --version 2 --server localhost:8500
    aekit demo

Heavy libraries (TensorFlow) are imported inside the subcommand, so `aekit --help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys


class UserError(Exception):
    """Anything the user can fix: printed as one line, exit status 2."""


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    # default=None everywhere: only flags the user gave override --config and the config defaults.
    p.add_argument("--config", help="JSON config file (as written to WORKDIR/config.json)")
    p.add_argument("--preset", help="compression | recognition: the measured settings for --latent-dim "
                                    "(default 32) for codes that compress or that a linear classifier reads "
                                    "(training/config.py); flags win")
    p.add_argument("--dataset", help="mnist-sample | npz:PATH | DIR of images | PATH.npy | tfrecord:DIR_OR_GLOB "
                                     "| tfds:NAME (paths local, gs:// or ram://)")
    p.add_argument("--data-dir", help="tensorflow-datasets data_dir")
    p.add_argument("--download", action="store_true", default=None, help="let tfds download (needs network)")
    p.add_argument("--model", help="dense | conv")
    p.add_argument("--latent-dim", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--lr-schedule", help="constant | cosine (decay to 0 over the run)")
    p.add_argument("--augment-shift", type=int, metavar="PIXELS",
                   help="move each training image by up to this many whole pixels in x and y (default 0: off)")
    p.add_argument("--shift-input-only", action="store_true", default=None,
                   help="with --augment-shift: move the input only and rebuild the image where it was, so the "
                        "code ignores small moves (better for classifiers, worse for compression)")
    p.add_argument("--quantization-noise", action="store_true", default=None,
                   help="train through uniform noise of one 8-bit step on the code (codes that survive a byte each)")
    p.add_argument("--latent-bound", help="conv code activation: none | sigmoid | tanh")
    p.add_argument("--conv-widths", help="conv filters per strided stage, e.g. 32,64")
    p.add_argument("--residual-blocks", type=int, help="conv: residual blocks at the smallest resolution")
    p.add_argument("--decoder-widths", help="conv decoder filters per stage, e.g. 64,128 (default: --conv-widths)")
    p.add_argument("--refine-convs", type=int, help="conv: stride-1 convolutions at full resolution before the output")
    p.add_argument("--linear-skip", help="conv: none | decoder (code->pixels beside the convolutions) | both "
                                         "(also pixels->code)")
    p.add_argument("--noise-factor", type=float, help="train a denoiser: std of input noise")
    p.add_argument("--loss", help="bce | mse")
    p.add_argument("--seed", type=int)
    p.add_argument("--workdir")
    p.add_argument("--model-base-path")
    p.add_argument("--no-export", dest="export", action="store_false", default=None)
    p.add_argument("--num-logical-devices", type=int, help="split the CPU into N devices (MirroredStrategy)")
    p.add_argument("--collective", help="multi-worker all-reduce: auto | ring | nccl")
    p.add_argument("--collective-timeout-seconds", type=float,
                   help="how long a silent peer (a stopped process, a lost host) is always tolerated, and a link "
                        "flap under half of it; silence for twice as long always fails the job in one line "
                        "(TensorFlow's heartbeat is set from it; a live peer that never joins an all-reduce fails "
                        "it after 3x, at least 2x + 10 s) (default 300)")
    p.add_argument("--rendezvous-timeout-seconds", type=float,
                   help="how long a worker waits for the others to start; it says whom it waits for every 5 s "
                        "(default 900: pods may start minutes apart)")
    p.add_argument("--checkpoint-every-steps", type=int)
    p.add_argument("--steps-per-loop", type=int, help="training steps per tf.function call")
    p.add_argument("--precision", help="float32 | mixed_bfloat16 (Ampere+ GPUs, TPUs, AVX512_BF16 CPUs) "
                                       "| mixed_float16 (Volta/Turing GPUs; loss-scaled)")
    p.add_argument("--profile-steps", metavar="START,END",
                   help="write a TensorBoard profiler trace of global steps START..END on the chief")
    p.add_argument("--max-examples", type=int, help="keep only the first N training examples")
    p.add_argument("--normal-classes", help="anomaly detection: train on these labels only, e.g. 3 or 0,1,7")
    p.add_argument("--threshold-fpr", type=float,
                   help="anomaly threshold that flags this fraction of held-out normal data (default 0.01)")
    p.add_argument("--anomaly-score", help="what score's anomaly_score and threshold use: combined (default: "
                                           "latent Mahalanobis + peak of the blurred residual) | mse (reconstruction MSE)")
    p.add_argument("--probe", action="store_true", default=None,
                   help="export also a classify signature: a linear probe fitted on the training split's codes")
    p.add_argument("--input-groups", type=int, help="streamed data: file sets per global batch (0: one per worker)")
    p.add_argument("--force-export", action="store_true", default=None,
                   help="export even if this training step is already exported")
    p.add_argument("--smoke", action="store_true", default=None, help="a seconds-long run")
    p.add_argument("--multiworker-local", type=int, metavar="N",
                   help="run N local worker processes with MultiWorkerMirroredStrategy")
    p.add_argument("--indexed-job", action="store_true",
                   help="build TF_CONFIG from a Kubernetes Indexed Job (JOB_COMPLETION_INDEX)")
    p.add_argument("--num-workers", type=int, help="with --indexed-job: the Job's completions")
    p.add_argument("--worker-host-pattern", help="with --indexed-job: e.g. aekit-train-{index}.aekit-train")
    p.add_argument("--worker-port", type=int, default=2222, help="with --indexed-job: collective port")


TRAIN_ONLY_FLAGS = {"config", "preset", "multiworker_local", "indexed_job", "num_workers", "worker_host_pattern",
                    "worker_port", "func", "command"}


def train_config_from_args(args: argparse.Namespace):
    from training.config import TrainConfig, preset_settings

    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in TRAIN_ONLY_FLAGS}
    if args.preset:  # the preset over --config and the defaults, the flags given over the preset
        overrides = {**preset_settings(args.preset, args.latent_dim or 0), **overrides}
    if args.config:
        return TrainConfig.from_file(args.config, **overrides)
    return TrainConfig(**overrides)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = train_config_from_args(args)
    if not args.multiworker_local:
        # Held until training installs its handler: TensorFlow replaces the SIGTERM handler while
        # workers meet, and a signal it takes is lost (see training.distribute.wait_for_workers).
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    if args.multiworker_local:
        from training import multiworker

        return multiworker.run_local_workers(args.multiworker_local, cfg)
    if args.indexed_job:
        from training import multiworker

        multiworker.set_tf_config_from_indexed_job(args.num_workers, args.worker_host_pattern, args.worker_port)
    from training import jobs

    result = jobs.train_job(cfg)
    print(json.dumps(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training import jobs

    version_dir, created = jobs.export_job(args.workdir, args.model_base_path, args.force, args.threshold_fpr,
                                           args.probe, args.anomaly_score)
    print(f"exported {version_dir}" if created else f"already exported as {version_dir} (--force to export again)")
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from training import anomaly, convert

    classes = anomaly.parse_classes(args.classes, "--classes") if args.classes else ()
    metadata = convert.convert(args.dataset, args.output, args.shards, args.data_dir, args.download, classes)
    counts = {name: split["count"] for name, split in metadata["splits"].items()}
    print(json.dumps({"output": args.output, "shape": metadata["shape"], "dtype": metadata["dtype"], **counts}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training import jobs

    if sum(map(bool, (args.probe, args.anomaly, args.compression))) > 1:
        raise UserError("--probe, --anomaly and --compression are separate evaluations; give one")
    if args.compression:
        from training import compress

        metrics = compress.evaluate_compression(args.model_base_path, args.dataset, args.data_dir)
        print(json.dumps(metrics) if args.json else "\n".join(
            f"{k:>18}: {v:.6g}" if isinstance(v, float) else f"{k:>18}: {v}" for k, v in metrics.items()))
        return 0
    if args.probe:
        from training import probe

        metrics = probe.evaluate_probe(args.model_base_path, args.dataset, args.data_dir)
        print(json.dumps(metrics) if args.json else probe.format_report(metrics))
        return 0
    if args.anomaly:
        from training import anomaly

        metrics = anomaly.evaluate_anomaly(args.model_base_path, args.dataset, args.normal_classes or "",
                                           args.anomalies or "", args.data_dir)
    elif args.normal_classes or args.anomalies:
        raise UserError("--normal-classes and --anomalies need --anomaly")
    else:
        metrics = jobs.evaluate_job(args.model_base_path, args.dataset, args.noise_factor, args.data_dir)
    if args.json:
        print(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            print(f"{key:>18}: {value:.6g}" if isinstance(value, float) else f"{key:>18}: {value}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from training import compress

    print(json.dumps(compress.compress_job(args.model_base_path, args.dataset, args.output, args.split, args.codec,
                                           args.data_dir)))
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    from training import compress

    print(json.dumps(compress.decompress_job(args.model_base_path, args.input, args.output, args.model_version)))
    return 0


def cmd_serve(args: argparse.Namespace, rest: list[str]) -> int:
    from serving import main as serving_main

    return serving_main.main(rest)


def cmd_client(args: argparse.Namespace) -> int:
    from clients import cli

    return cli.run(args)


def cmd_plot(args: argparse.Namespace) -> int:
    from clients import plots

    for path in plots.plot_workdir(args.workdir, args.output_dir, args.model_base_path, args.dataset):
        print(path)
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from clients import loadtest

    cfg = loadtest.LoadConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(loadtest.LoadConfig)})
    report = loadtest.run(cfg, own_process=True)
    print(loadtest.format_table(report))
    print(json.dumps(report))
    return 0 if report["errors"] == 0 else 1


def cmd_release(args: argparse.Namespace) -> int:
    from clients import release

    print(json.dumps(release.release(args.config, args.model, args.label, args.version, args.server, args.timeout)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from clients import demo

    demo.run_demo(demo.DemoConfig(output_dir=args.output_dir, smoke=args.smoke, epochs=args.epochs))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aekit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train an autoencoder and export a version")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export the latest checkpoint of a workdir")
    p.add_argument("--workdir", required=True)
    p.add_argument("--model-base-path", help="default: the one in WORKDIR/config.json")
    p.add_argument("--threshold-fpr", type=float,
                   help="recalibrate the anomaly threshold to this held-out false-positive rate")
    p.add_argument("--anomaly-score", help="mse | combined: the score the threshold is on (default: the workdir's)")
    p.add_argument("--force", action="store_true", help="export even if this training step is already exported")
    p.add_argument("--probe", action="store_true",
                   help="add classify signatures: a linear probe fitted on the training split's codes")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("data", help="prepare data: `aekit data convert` writes TFRecord shards")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    c = data_sub.add_parser("convert", help="write any source as train/test TFRecord shards + metadata.json")
    c.add_argument("--dataset", required=True, help="any source `aekit train --dataset` reads")
    c.add_argument("--output", required=True, help="a folder: local, gs:// or ram://")
    c.add_argument("--shards", type=int, default=8, help="train shards (test gets a quarter); at least the worker count")
    c.add_argument("--data-dir", help="tensorflow-datasets data_dir")
    c.add_argument("--download", action="store_true", help="let tfds download (needs network)")
    c.add_argument("--classes", help="keep only these labels in both splits, e.g. 3 or 0,1,7: a one-class "
                                     "training set for anomaly detection that streams")
    c.set_defaults(func=cmd_data_convert)

    p = sub.add_parser("evaluate", help="score the latest exported version on a test split")
    p.add_argument("--model-base-path", required=True)
    p.add_argument("--dataset", default="mnist-sample")
    p.add_argument("--data-dir")
    p.add_argument("--noise-factor", type=float, default=0.0)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--anomaly", action="store_true",
                   help="detection quality: AUROC, average precision, and FPR/recall/precision/F1 at the threshold")
    p.add_argument("--normal-classes", help="with --anomaly: the labels the model was trained on; the rest are anomalies")
    p.add_argument("--anomalies", metavar="SRC", help="with --anomaly: a separate source of anomalies")
    p.add_argument("--probe", action="store_true",
                   help="recognition: linear-probe and k-NN accuracy of the codes, beside raw pixels and PCA")
    p.add_argument("--compression", action="store_true",
                   help="held-out PSNR of decompress(compress(x)) and the code file's bytes per image")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compress", help="a dataset split -> a code file (one byte per latent dimension)")
    p.add_argument("--model-base-path", required=True, help="the latest version compresses")
    p.add_argument("--dataset", required=True, help="any source `aekit train --dataset` reads")
    p.add_argument("--data-dir")
    p.add_argument("--split", default="test", choices=("train", "test", "all"))
    p.add_argument("--output", required=True, help="the code file to write")
    p.add_argument("--codec", default="zlib", choices=("none", "zlib", "lzma"),
                   help="entropy coder for the codes (zlib: smaller on mnist-sample, see README)")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("decompress", help="a code file -> an .npz of uint8 images (and labels)")
    p.add_argument("--model-base-path", required=True)
    p.add_argument("--model-version", type=int, help="default and only accepted: the version in the file")
    p.add_argument("--input", required=True, help="a code file written by `aekit compress`")
    p.add_argument("--output", required=True, help=".npz with images (uint8) and labels")
    p.set_defaults(func=cmd_decompress)

    p = sub.add_parser("serve", add_help=False,
                       help="serve SavedModels with TF Serving's flags (aekit serve --help)")
    p.set_defaults(func=cmd_serve)

    from clients.cli import add_client_parser  # light: no TensorFlow import

    add_client_parser(sub).set_defaults(func=cmd_client)

    p = sub.add_parser("plot", help="figures from a workdir (and a model): curves, reconstructions, latents")
    p.add_argument("--workdir", required=True)
    p.add_argument("--output-dir", default="figures")
    p.add_argument("--model-base-path", help="also plot reconstructions, latent space and scores")
    p.add_argument("--dataset", default="mnist-sample")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("loadtest", help="bounded load against a server: throughput and latency")
    from clients.loadtest import add_loadtest_flags

    add_loadtest_flags(p)
    p.set_defaults(func=cmd_loadtest)

    p = sub.add_parser("release", help="move a version label (stable, canary) to a version on running servers")
    from clients.release import add_release_flags

    add_release_flags(p)
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("demo", help="train, export, serve, call and plot on the built-in data")
    p.add_argument("--output-dir", default="demo-output")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="a seconds-long run (tests)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter hides our output
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":  # TF Serving's flags are parsed by the server itself
        return _guarded(lambda: cmd_serve(None, argv[1:]))
    args = build_parser().parse_args(argv)
    return _guarded(lambda: args.func(args))


def _guarded(run) -> int:
    from training.config import ConfigError

    try:
        return run()
    except (UserError, ConfigError, FileNotFoundError) as e:
        print(f"aekit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aekit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - typed errors from the libraries are mapped here once
        # Library errors a user acts on carry their exit status (ClientError, Preempted, WorkerLost,
        # ExportError); anything else is a bug and keeps its traceback.
        if not hasattr(e, "exit_code"):
            raise
        print(f"aekit: {e}" if e.exit_code == 143 else f"aekit: error: {e}", file=sys.stderr)
        if getattr(e, "abandon_process", False):
            # A thread is stuck in TensorFlow's connect call: end now rather than hang in its teardown.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.exit_code)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
