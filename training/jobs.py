"""The training-side jobs behind `aekit train`, `aekit export` and `aekit evaluate`.

Each reads top to bottom: build what it needs from a config, run it, say where the result is.
"""

from __future__ import annotations

import hashlib

import numpy as np
import tensorflow as tf

from storage import paths
from training import (
    anomaly,
    data,
    distribute,
    export,
    precision,
    probe,
    quantize,
    scoring,
    train,
)
from training.config import ConfigError, TrainConfig
from training.evaluate import evaluate_saved_model

SAMPLE_IMAGES = 8  # held-out examples used to check the export and to write warmup records


def train_job(cfg: TrainConfig) -> dict:
    """Trains (resuming from cfg.workdir) and, on the chief, exports a new version.

    A job whose checkpoint already holds every epoch needs no peers: the chief exports, the
    others exit at once, so a restarted worker never waits for workers that finished.
    """
    tf_config = distribute.read_tf_config()
    paths.check(cfg.workdir, "--workdir")  # before completed_step reads it: an unknown scheme is one line
    done = train.completed_step(cfg)
    if done is not None:
        return finished_job(cfg, tf_config, done)
    strategy = distribute.make_strategy(cfg.num_logical_devices, cfg.collective, cfg.collective_timeout_seconds,
                                        cfg.rendezvous_timeout_seconds)
    check_paths(cfg, exporting=cfg.export and distribute.is_chief(strategy))
    with train.StopSignal() as stop:  # from here on a SIGTERM stops the job where it is
        source = load_training_source(cfg, tf_config, stop)
        state, history = train.train_and_evaluate(cfg, source, strategy, stop)
        result = {"workdir": cfg.workdir, "step": int(state.step.numpy()), "task": distribute.task_name(strategy),
                  "weights_sha256": weights_fingerprint(state), **(history[-1] if history else {})}
        if cfg.export and state.is_chief:
            _stop_if_asked(stop, result["step"])
            result["export"] = _export_and_say(state, cfg, source, result["step"])
    return result


def finished_job(cfg: TrainConfig, tf_config: dict | None, step: int) -> dict:
    """Training is complete at `step`: export on the chief (export is idempotent per step), else nothing."""
    task, chief = distribute.task_of(tf_config), distribute.is_chief_task(tf_config)
    print(f"{task} ({'chief' if chief else 'worker'}): training is already complete at step {step}; "
          f"{'exporting without the other workers' if chief and cfg.export else 'nothing to do'}", flush=True)
    result = {"workdir": cfg.workdir, "step": step, "task": task, "complete": True}
    if chief and cfg.export:
        check_paths(cfg, exporting=True)
        with train.StopSignal() as stop:
            source = load_training_source(cfg, tf_config, stop)
            state = train.build_state(cfg, source.input_shape, tf.distribute.get_strategy())
            _stop_if_asked(stop, step)
            result["weights_sha256"] = weights_fingerprint(state)
            result["export"] = _export_and_say(state, cfg, source, step)
    return result


def _export_and_say(state: train.TrainState, cfg: TrainConfig, source: data.Source, step: int) -> str:
    version_dir, created = export_trained(state, cfg, source)
    print(f"exported {version_dir}" if created else
          f"step {step} is already exported as {version_dir} (--force-export to export again)", flush=True)
    return version_dir


def _stop_if_asked(stop: train.StopSignal, step: int) -> None:
    if stop.requested:
        raise train.Preempted(f"stopped by SIGTERM before export; the checkpoint at step {step} is saved, "
                              "rerun to export it")


def check_paths(cfg: TrainConfig, exporting: bool) -> None:
    """Fails in one line, before any training, on a path that cannot be written (or read)."""
    if cfg.data_dir:
        paths.check(cfg.data_dir, "--data-dir")
    paths.check_writable(cfg.workdir, "--workdir")
    if exporting:
        paths.check_writable(cfg.model_base_path, "--model-base-path")


def load_training_source(cfg: TrainConfig, tf_config: dict | None = None,
                         stop: train.StopSignal | None = None) -> data.Source:
    """The data source; with cfg.normal_classes, only those classes.

    A streamed source's normal classes are written to WORKDIR/normal-classes/TASK, one copy per
    worker (workers need not share storage), with at least one train shard per worker. A SIGTERM
    (`stop`) ends the writing between batches.
    """
    source = data.load_source(cfg.dataset, cfg.data_dir, cfg.download)
    if not cfg.normal_classes:
        return source
    copy_dir = paths.join(cfg.workdir, "normal-classes", distribute.task_of(tf_config))

    def check_stop():
        if stop is not None and stop.requested:
            raise train.Preempted("stopped by SIGTERM while writing the normal classes; nothing is trained yet, "
                                  "rerun to write them again")
    return anomaly.normal_source(source, anomaly.parse_classes(cfg.normal_classes), cfg.dataset, copy_dir,
                                 max(8, distribute.num_workers(tf_config)), check_stop)


def weights_fingerprint(state: train.TrainState) -> str:
    """A hash of every weight: equal on all workers when synchronous training kept them in step."""
    digest = hashlib.sha256()
    for variable in state.autoencoder.weights:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()


def export_trained(state: train.TrainState, cfg: TrainConfig, source: data.Source | data.Arrays,
                   force: bool | None = None) -> tuple[str, bool]:
    """Fits the anomaly score's statistics on the training split (training.scoring), calibrates
    the threshold on the served anomaly_score (cfg.anomaly_score) of held-out (normal) data and
    publishes the next version, unless this training step with these weights, this score and this
    threshold's false-positive rate is already published: (version folder, created). A new rate
    (export --threshold-fpr) or score (--anomaly-score) is a new version.
    With cfg.probe a linear probe is fitted on the training split's codes and served as classify.
    The compress/decompress quantization ranges come from the same pass over the training codes."""
    splits = source.source() if isinstance(source, data.Arrays) else source
    test = splits.test
    # float32 layers with the trained (float32) weights: the served model is float32 in and out
    # whatever --precision trained it; the threshold and verify_export use these same halves.
    encoder, decoder = precision.float32_copy(state.encoder), precision.float32_copy(state.decoder)
    kernel = scoring.gaussian_kernel()
    train_codes, train_blurred = scoring.codes_and_blurred(encoder, decoder, splits.train, kernel)  # one pass
    stats = scoring.fit_score_stats(train_codes, train_blurred, cfg.anomaly_score, kernel)
    ranges = quantize.ranges_of([train_codes])
    scores = scoring.anomaly_scores(encoder, decoder, test, stats)
    threshold = export.calibrate_threshold(scores, cfg.calibration_fpr, stats.kind)
    print(threshold.describe(), flush=True)
    sample = next(iter(data.eval_dataset(data.limit(test, SAMPLE_IMAGES), SAMPLE_IMAGES)))[1].numpy()
    identity = {"step": int(state.step.numpy()), "weights_sha256": weights_fingerprint(state),
                "threshold_fpr": threshold.fpr, "anomaly_score": stats.kind}
    classifier = None
    if cfg.probe:
        classifier = probe.fit_export_probe(lambda x: encoder(x, training=False), splits.train, cfg.dataset)
        print(classifier.describe(), flush=True)
        identity["probe_class_ids"] = classifier.class_ids.tolist()  # a probed export is its own version
    return export.export_version(encoder, decoder, cfg.model_base_path, threshold, sample,
                                 identity, cfg.force_export if force is None else force, classifier, ranges,
                                 stats=stats)


def export_job(workdir: str, model_base_path: str | None = None, force: bool = False,
               threshold_fpr: float | None = None, with_probe: bool = False,
               anomaly_score: str | None = None) -> tuple[str, bool]:
    """Exports the latest checkpoint in `workdir` with the config it was trained with.

    `threshold_fpr` recalibrates the anomaly threshold to that false-positive rate on held-out
    normal data: a new version from the same weights, without retraining; `anomaly_score` (mse |
    combined) chooses the score it is on (default: the workdir's). `with_probe` adds the
    classify signatures (as training with --probe does).
    """
    paths.check(workdir, "--workdir")
    config_path = paths.join(workdir, "config.json")
    if not paths.exists(config_path):
        raise ConfigError(f"{workdir} has no config.json; is it a workdir written by `aekit train`?")
    overrides = {"workdir": workdir, "num_logical_devices": 0}
    if model_base_path:
        overrides["model_base_path"] = model_base_path
    if threshold_fpr is not None:
        overrides["threshold_fpr"] = threshold_fpr
    if with_probe:
        overrides["probe"] = True
    if anomaly_score is not None:
        overrides["anomaly_score"] = anomaly_score
    cfg = TrainConfig.from_file(config_path, **overrides)
    if tf.train.latest_checkpoint(paths.join(workdir, "checkpoints")) is None:
        raise ConfigError(f"{workdir}/checkpoints has no checkpoint to export; train first")
    paths.check_writable(cfg.model_base_path, "--model-base-path")
    source = load_training_source(cfg)
    state = train.build_state(cfg, source.input_shape, tf.distribute.get_strategy())
    return export_trained(state, cfg, source, force)


def evaluate_job(model_base_path: str, dataset: str, noise_factor: float = 0.0,
                 data_dir: str | None = None) -> dict:
    return evaluate_saved_model(model_base_path, dataset, noise_factor, data_dir)
