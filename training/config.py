"""One config object per training run.

    aekit train --dataset mnist-sample --model conv --epochs 10 --num-logical-devices 2
    # -> checkpoints and config.json in runs/ae, a new version under models/autoencoder

Every field has a default that works on a laptop; `--smoke` shrinks any config to seconds.
"""

from __future__ import annotations

import dataclasses
import json
import typing

from storage import paths

MODELS = ("dense", "conv")
LOSSES = ("bce", "mse")
COLLECTIVES = ("auto", "ring", "nccl")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
ANOMALY_SCORES = ("mse", "combined")  # training.scoring.score_outputs defines both
LATENT_BOUNDS = ("none", "sigmoid", "tanh")
LR_SCHEDULES = ("constant", "cosine")
LINEAR_SKIPS = ("none", "decoder", "both")
DEFAULT_LATENT_DIM = {"dense": 32, "conv": 128}


# Compression (issue 18): TrainConfig fields per code size (bytes per image at one byte per
# dimension), chosen by measurement in benchmarks/bench_codes.py (held-out mnist-sample, table in
# its docstring). `aekit train --preset compression --latent-dim N` and the rate-distortion
# benchmark train with these; the defaults above stay what the demo's denoiser and anomaly use.
# augment_shift 1: random 1-pixel moves cut the overfitting of 4,000 images (32 B: 23.02 -> 24.37 dB).
_COMPRESSION_BASE = {"loss": "mse", "batch_size": 16, "learning_rate": 1e-3, "lr_schedule": "cosine",
                     "refine_convs": 1, "linear_skip": "decoder", "augment_shift": 1, "shift_input_only": False}
COMPRESSION_SETTINGS: dict[int, dict] = {latent: {**_COMPRESSION_BASE, "epochs": epochs}
                                         for latent, epochs in ((16, 30), (32, 40), (64, 30), (128, 50))}
# Recognition (issue 18): codes for a linear classifier. The compression preset's training, but
# each input moved by up to 4 pixels while the target stays where it was (shift_input_only), so
# the code learns to ignore small moves. Linear probe on the 32-d code, held-out mnist-sample:
# moving both 0.916 (10 labels per class 0.804); input only, up to 1/2/3/4/5 pixels:
# 0.927/0.945/0.962/0.964/0.967 (0.831/0.856/0.881/0.895/0.891). Reconstruction gets worse
# (held-out 24.4 -> 18.5 dB at 4 pixels), which is why it is a preset of its own.
RECOGNITION_SETTINGS: dict[int, dict] = {32: {**COMPRESSION_SETTINGS[32], "augment_shift": 4,
                                              "shift_input_only": True}}
PRESET_SETTINGS = {"compression": COMPRESSION_SETTINGS, "recognition": RECOGNITION_SETTINGS}
PRESETS = tuple(PRESET_SETTINGS)
DEFAULT_PRESET_LATENT = 32  # --preset without --latent-dim: the 32-d code of the bars


class ConfigError(ValueError):
    """A setting the user can fix; the CLI prints it as one line."""


@dataclasses.dataclass
class TrainConfig:
    dataset: str = "mnist-sample"  # mnist-sample | npz:PATH | a folder of images | PATH.npy | tfrecord:DIR_OR_GLOB | tfds:NAME
    data_dir: str | None = None  # tensorflow-datasets data_dir (tfds:NAME only); local, gs:// or ram://
    download: bool = False  # tfds may download; off so a dead network never hangs a run
    model: str = "conv"  # dense (the seed blog's MLP) | conv (strided Conv2D / Conv2DTranspose)
    latent_dim: int = 0  # size of the code; 0 = the model's default (dense 32 as in the seed blog, conv 128)
    epochs: int = 10  # passes over the training split
    batch_size: int = 64  # GLOBAL batch: split across replicas and workers, same meaning everywhere
    learning_rate: float = 2e-3  # Adam; conv reaches test MSE < 0.005 in 10 epochs on mnist-sample
    lr_schedule: str = "constant"  # constant | cosine (decays to 0 over all epochs' steps)
    augment_shift: int = 0  # >0: each training image moved by up to this many whole pixels in x and y (images only)
    shift_input_only: bool = False  # with augment_shift: move the input only, the target stays (codes that ignore moves)
    quantization_noise: bool = False  # train through U(-0.5, 0.5) of one 8-bit step on the code (models.QuantizationNoise)
    latent_bound: str = "none"  # conv code activation: none (linear) | sigmoid | tanh (fixed range)
    conv_widths: str = "32,64"  # conv filters per strided stage, comma-separated; each stage halves the image
    residual_blocks: int = 0  # conv: residual blocks at the smallest resolution, in the encoder and the decoder
    decoder_widths: str = ""  # conv decoder filters per stage (the last also the Dense->small projection's); "" = conv_widths
    refine_convs: int = 0  # conv: stride-1 3x3 convolutions at full resolution before the decoder's output
    linear_skip: str = "none"  # conv: none | decoder (Dense code->pixels added to the output logits) | both (also pixels->code)
    noise_factor: float = 0.0  # std of Gaussian noise added to inputs; >0 trains a denoiser
    loss: str = "bce"  # bce (pixels in [0, 1]) | mse
    seed: int = 42  # weights, shuffling and noise
    workdir: str = "runs/ae"  # checkpoints, TensorBoard scalars, config.json, history.json
    model_base_path: str = "models/autoencoder"  # export root; versions are numeric sub-folders
    export: bool = True  # export a new version after training
    num_logical_devices: int = 0  # >1 splits the CPU into N devices to try MirroredStrategy here
    collective: str = "auto"  # multi-worker all-reduce: ring on CPU, nccl on GPUs
    collective_timeout_seconds: float = 300.0  # how long a silent peer is tolerated (heartbeat 2x; all-reduces wait ~3x)
    rendezvous_timeout_seconds: float = 900.0  # how long a worker waits for the others to start (pods minutes apart)
    checkpoint_every_steps: int = 100  # also saved at every epoch end and on SIGTERM
    precision: str = "float32"  # | mixed_bfloat16 (Ampere+ GPUs, TPUs, conv on AVX512_BF16 CPUs: README) | mixed_float16 (Volta/Turing)
    profile_steps: str = ""  # "START,END": a TensorBoard profiler trace of these global steps on the chief; "" = off
    steps_per_loop: int = 20  # steps per tf.function call: fewer Python round trips; SIGTERM is seen between calls
    anomaly_quantile: float = 0.99  # held-out error quantile used as the anomaly threshold
    threshold_fpr: float = 0.0  # >0: threshold flags this fraction of held-out normal data; 0 = 1 - anomaly_quantile
    anomaly_score: str = "combined"  # what score's anomaly_score and threshold use: mse | combined (latent
    #                                  Mahalanobis + blurred residual's peak; mean one-class AUROC 0.971 vs 0.955, bench_one_class)
    normal_classes: str = ""  # anomaly detection: labels to train on, e.g. "3" or "0,1,7"; "" = every label
    max_examples: int = 0  # >0 keeps only the first N training examples (smoke runs, tests)
    input_groups: int = 0  # streamed sources: each global batch comes from this many disjoint file sets;
    #                        0 = one per worker. Fix it (e.g. to 4) for the same batches on 1, 2 or 4 workers
    probe: bool = False  # export also classify signatures: a linear probe fitted on the training split's codes
    force_export: bool = False  # export even when a version of this training step already exists
    smoke: bool = False  # seconds-long run: 1 epoch on 512 examples

    def __post_init__(self) -> None:
        _check_types(self)  # before the arithmetic below trips over a string
        self.latent_dim = self.latent_dim or DEFAULT_LATENT_DIM.get(self.model, 32)
        if self.smoke:
            self.epochs = min(self.epochs, 1)
            self.max_examples = self.max_examples or 512
            self.batch_size = min(self.batch_size, 64)
        self.validate()

    def validate(self) -> None:
        _check_choice("model", self.model, MODELS)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("collective", self.collective, COLLECTIVES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("anomaly-score", self.anomaly_score, ANOMALY_SCORES)
        _check_choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("latent-bound", self.latent_bound, LATENT_BOUNDS)
        _check_choice("linear-skip", self.linear_skip, LINEAR_SKIPS)
        self.widths  # noqa: B018 -- parses, so a bad --conv-widths fails before training
        self.decoder_stage_widths  # noqa: B018 -- likewise --decoder-widths
        if self.refine_convs < 0:
            raise ConfigError(f"--refine-convs must be 0 or more, got {self.refine_convs}")
        if not 0 <= self.augment_shift <= 8:
            raise ConfigError(f"--augment-shift must be 0 to 8 pixels, got {self.augment_shift}")
        if self.shift_input_only and not self.augment_shift:
            raise ConfigError("--shift-input-only moves the inputs by --augment-shift pixels; give --augment-shift N "
                              "(1 to 8) with it, or drop --shift-input-only (--preset recognition sets it)")
        if self.residual_blocks < 0:
            raise ConfigError(f"--residual-blocks must be 0 or more, got {self.residual_blocks}")
        self.profile_range  # noqa: B018 -- parses, so a bad --profile-steps fails before training
        _check_positive("epochs", self.epochs)
        _check_positive("batch-size", self.batch_size)
        _check_positive("latent-dim", self.latent_dim)
        _check_positive("learning-rate", self.learning_rate)
        _check_positive("checkpoint-every-steps", self.checkpoint_every_steps)
        _check_positive("steps-per-loop", self.steps_per_loop)
        _check_positive("collective-timeout-seconds", self.collective_timeout_seconds)
        _check_positive("rendezvous-timeout-seconds", self.rendezvous_timeout_seconds)
        if self.input_groups < 0:
            raise ConfigError("--input-groups must be 0 (one per worker) or a positive count")
        if not 0.0 <= self.noise_factor <= 1.0:
            raise ConfigError(f"--noise-factor must be in [0, 1], got {self.noise_factor}")
        if not 0.5 <= self.anomaly_quantile < 1.0:
            raise ConfigError(f"anomaly_quantile must be in [0.5, 1), got {self.anomaly_quantile}")
        if not 0.0 <= self.threshold_fpr < 0.5:
            raise ConfigError(f"--threshold-fpr must be in (0, 0.5), got {self.threshold_fpr}")
        if self.num_logical_devices < 0:
            raise ConfigError("--num-logical-devices must be 0 (off) or a positive count")

    @property
    def widths(self) -> tuple[int, ...]:
        """--conv-widths as a tuple of positive filter counts."""
        return _filter_counts("conv-widths", self.conv_widths)

    @property
    def decoder_stage_widths(self) -> tuple[int, ...] | None:
        """--decoder-widths as a tuple of positive filter counts, or None (= --conv-widths)."""
        if not self.decoder_widths:
            return None
        counts = _filter_counts("decoder-widths", self.decoder_widths)
        if len(counts) != len(self.widths):
            raise ConfigError(f"--decoder-widths needs one filter count per strided stage ({len(self.widths)}, "
                              f"as --conv-widths {self.conv_widths}); got {self.decoder_widths!r}")
        return counts

    def model_options(self) -> dict:
        """Builder keyword arguments for models.build_autoencoder (the conv options; dense takes none)."""
        if self.model != "conv":
            return {}
        return {"widths": self.widths, "residual_blocks": self.residual_blocks, "latent_bound": self.latent_bound,
                "decoder_widths": self.decoder_stage_widths, "refine_convs": self.refine_convs,
                "linear_skip": self.linear_skip}

    @property
    def profile_range(self) -> tuple[int, int] | None:
        """(start, end) global steps of --profile-steps, both included, or None when off."""
        if not self.profile_steps:
            return None
        parts = self.profile_steps.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"--profile-steps must be START,END (two step numbers, e.g. 10,20); "
                              f"got {self.profile_steps!r}")
        start, end = (int(p) for p in parts)
        if not 0 < start <= end:
            raise ConfigError(f"--profile-steps needs 0 < START <= END; got {self.profile_steps!r}")
        return start, end

    @property
    def calibration_fpr(self) -> float:
        """The false-positive rate on held-out normal data that the anomaly threshold is set to."""
        return self.threshold_fpr or round(1.0 - self.anomaly_quantile, 12)

    def save(self, workdir: str) -> str:
        path = paths.join(paths.makedirs(workdir), "config.json")
        paths.write_text(path, json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def from_file(cls, path: str, **overrides) -> TrainConfig:
        """Reads a JSON config (as written by `save`); `overrides` win over the file."""
        path = paths.check(path, "--config")
        if not paths.exists(path):
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = json.loads(paths.read_text(path))
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"config file {path} has unknown keys {unknown}; known: {sorted(known)}")
        values.update(overrides)
        return cls(**values)


def _check_types(cfg: TrainConfig) -> None:
    """A value of the wrong JSON type (``"epochs": "10"``) is named here, not deep in TensorFlow."""
    hints = typing.get_type_hints(type(cfg))
    for field in dataclasses.fields(cfg):
        value, expected = getattr(cfg, field.name), hints[field.name]
        allowed = typing.get_args(expected) or (expected,)  # `str | None` -> (str, NoneType)
        if float in allowed:
            allowed += (int,)  # JSON writes 300.0 as 300 when a person types it
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed if t is not int or
                                float not in allowed)
            raise ConfigError(f"config value {field.name!r} must be {names}, got {value!r} "
                              f"({type(value).__name__})")


def preset_settings(name: str, latent_dim: int = 0) -> dict:
    """TrainConfig fields of preset `name` for a code of `latent_dim` (0: DEFAULT_PRESET_LATENT);
    a size that was not measured takes the settings of the nearest measured one."""
    _check_choice("preset", name, PRESETS)
    latent_dim = latent_dim or DEFAULT_PRESET_LATENT
    settings = PRESET_SETTINGS[name]
    nearest = min(settings, key=lambda size: (abs(size - latent_dim), size))
    return {**settings[nearest], "model": "conv", "latent_dim": latent_dim}


def _filter_counts(flag: str, text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--{flag} must be positive filter counts separated by commas (e.g. 32,64); got {text!r}")
    return tuple(int(p) for p in parts)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"--{name} must be positive, got {value}")
