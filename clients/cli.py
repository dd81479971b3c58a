"""`aekit client`: call a model server from the shell.

    aekit client denoise --server localhost:8500 --model autoencoder --input digits/ --output clean/
    aekit client score --server localhost:8501 --rest --model autoencoder --input x.npy
    aekit client status --server localhost:8500 --model autoencoder
    aekit client classify --server localhost:8500 --model autoencoder --input digits/   # export --probe
    aekit client compress --server localhost:8500 --model autoencoder --input digits/ --output codes.npy
    aekit client decompress --server localhost:8501 --rest --model autoencoder --input codes.npy --output out/

gRPC by default, REST with --rest. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from clients.base import LOAD_BALANCING_POLICIES

METHODS = ("encode", "decode", "denoise", "score", "classify", "compress", "decompress", "status", "metadata")


def add_client_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("client", help="call encode/decode/denoise/score/classify/compress/decompress/status/"
                                             "metadata on a server")
    p.add_argument("method", choices=METHODS)
    p.add_argument("--server", default="localhost:8500",
                   help="HOST:PORT (the REST port with --rest); gRPC also dns:///HOST:PORT, ipv4:IP:PORT,IP:PORT")
    p.add_argument("--model", default="autoencoder")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", type=int)
    which.add_argument("--label")
    p.add_argument("--rest", action="store_true", help="use TF Serving's REST API instead of gRPC")
    p.add_argument("--input", help=".npy, a PNG/JPEG image, or a folder of images")
    p.add_argument("--output", help=".npy, a .png (one image) or a folder for PNGs")
    p.add_argument("--add-noise", type=float, default=0.0, help="denoise: add Gaussian noise of this std first")
    p.add_argument("--error-map", metavar="DIR|.npy",
                   help="score: write each input's per-pixel squared error (error_map) as images or .npy")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    p.add_argument("--load-balancing", default="pick_first", choices=LOAD_BALANCING_POLICIES,
                   help="gRPC: round_robin spreads calls over every address --server resolves to")
    p.add_argument("--tls", action="store_true", help="gRPC over TLS")
    p.add_argument("--ca-cert", help="with --tls: PEM file of the CA that signed the server certificate")
    return p


def make_client(args):
    from clients import AutoencoderClient, RestAutoencoderClient
    from clients.errors import ClientError

    common = dict(model=args.model, version=args.version, label=args.label, timeout=args.timeout)
    if args.rest:
        if args.load_balancing != "pick_first":
            raise ClientError("--load-balancing is for gRPC: REST calls go over one HTTP connection; spread "
                              "them with a Service or an ingress", "INVALID_ARGUMENT")
        return RestAutoencoderClient(args.server, **common)
    root = open(args.ca_cert, "rb").read() if args.ca_cert else None
    return AutoencoderClient(args.server, tls=args.tls, root_certificates=root, load_balancing=args.load_balancing,
                             **common)


def run(args: argparse.Namespace) -> int:
    from clients import io
    from clients.errors import ClientError

    client = make_client(args)
    if args.method == "status":
        print(json.dumps([{**s, **_threshold_of(client, s)} for s in client.status()]))
        return 0
    if args.method == "metadata":
        print(json.dumps({name: {"inputs": {k: list(v.shape) for k, v in s.inputs.items()},
                                 "outputs": {k: list(v.shape) for k, v in s.outputs.items()}}
                          for name, s in client.metadata().items() if not name.startswith("__")}))
        return 0
    if not args.input:
        raise ClientError(f"aekit client {args.method} needs --input", "INVALID_ARGUMENT")
    signature = client.signatures()[args.method] if args.method in client.signatures() else None
    if signature is None:
        hint = " (export it with `aekit export --probe` or train with --probe)" if args.method == "classify" else ""
        raise ClientError(f"model {args.model} has no {args.method!r} signature{hint}", "INVALID_ARGUMENT")
    if args.method == "decompress":
        batch = _load_codes(args.input, signature.inputs[signature.input_alias].shape)
    else:
        batch = io.load_input(args.input, signature.inputs[signature.input_alias].shape)
    if args.add_noise > 0:
        noise = np.random.default_rng(0).normal(0.0, args.add_noise, batch.shape).astype(np.float32)
        batch = np.clip(batch + noise, 0.0, 1.0)
    if args.method == "score":
        result = client.score(batch)
        scores = result.get("anomaly_score", result["error"])  # exports before anomaly_score: the error
        for i, (error, score, flag) in enumerate(zip(result["error"], scores, result["is_anomaly"])):
            print(f"{i:5d}  error {error:.6f}  anomaly score {score:.6f}  {'ANOMALY' if flag else 'ok'}")
        print(f"threshold {float(result['threshold'][0]):.6f} on the {_score_kind(result)} score; "
              f"{int(np.sum(result['is_anomaly']))} of {len(batch)} flagged")
        if args.output:
            io.save_output(np.stack([result["error"], result["is_anomaly"]], axis=1), args.output)
        if args.error_map:
            raw = args.error_map.endswith(".npy")  # PNGs need visible values, .npy keeps the true ones
            maps = result["error_map"] if raw else _scaled_error_map(result["error_map"])
            written = io.save_output(maps, args.error_map)
            print(f"wrote {len(written)} error map(s) to {args.error_map}")
        return 0
    if args.method == "classify":
        return _print_classes(client.classify(batch), args.output)
    output = getattr(client, args.method)(batch)
    if args.output:
        written = io.save_output(output, args.output)
        print(f"wrote {len(written)} file(s) to {args.output}: {args.method} of {len(batch)} input(s), "
              f"shape {output.shape}")
    else:
        print(json.dumps({"shape": list(output.shape), "mean": float(np.mean(output))}))
    return 0


def _load_codes(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 codes (N, D) of a .npy written by `aekit client compress`; other dtypes are refused,
    since casting floats to bytes would decode garbage."""
    from pathlib import Path

    from clients.errors import ClientError

    if Path(path).suffix != ".npy" or not Path(path).is_file():
        raise ClientError(f"decompress needs a .npy file of uint8 codes (from `aekit client compress`); "
                          f"{path} is not one", "INVALID_ARGUMENT")
    codes = np.load(path, allow_pickle=False)
    if codes.dtype != np.uint8:
        raise ClientError(f"{path} holds {codes.dtype} values; decompress takes the uint8 codes that "
                          "`aekit client compress` writes", "INVALID_ARGUMENT")
    return codes[None] if codes.ndim == len(shape) - 1 else codes


def _print_classes(result: dict[str, np.ndarray], output: str | None) -> int:
    """One line per image: its predicted class and that class's probability (the confidence)."""
    from clients import io

    confidence = np.max(result["scores"], axis=1)
    for i, (cls, p) in enumerate(zip(result["classes"], confidence)):
        print(f"{i:5d}  class {int(cls)}  confidence {float(p):.4f}")
    if output:
        io.save_output(np.stack([result["classes"].astype(np.float32), confidence], axis=1), output)
    return 0


def _threshold_of(client, status: dict) -> dict:
    """An AVAILABLE version's anomaly threshold, its false-positive rate and the score it is on, read through its score
    signature (one blank input): signature outputs are what every TF Serving client can see."""
    if status["state"] != "AVAILABLE":
        return {}
    signatures = client.signatures(version=status["version"])
    outputs = signatures["score"].outputs if "score" in signatures else {}
    if "threshold" not in outputs:
        return {}
    shape = signatures["score"].inputs[signatures["score"].input_alias].shape
    blank = np.zeros((1, *[max(d, 1) for d in shape[1:]]), np.float32)
    result = client.score(blank, version=status["version"])
    found = {"anomaly_threshold": float(result["threshold"][0])}
    if "threshold_fpr" in result:
        found["threshold_fpr"] = float(result["threshold_fpr"][0])
    found["anomaly_score"] = _score_kind(result)
    return found


def _score_kind(result: dict) -> str:
    """Which score the threshold is on: mse | combined (exports before anomaly_score_kind: mse)."""
    if "anomaly_score_kind" not in result:
        return "mse"
    kind = result["anomaly_score_kind"][0]
    return kind.decode() if isinstance(kind, bytes) else str(kind)


def _scaled_error_map(error_map: np.ndarray) -> np.ndarray:
    """Squared errors are at most 1 but mostly tiny: scale by the batch's largest so PNGs show them."""
    return error_map / max(float(np.max(error_map)), 1e-12)
