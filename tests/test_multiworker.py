"""MultiWorkerMirroredStrategy with local worker processes: agreement, chief-only export,
a dead worker, SIGTERM, restart and resume; TF_CONFIG from an Indexed Job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from training import distribute, multiworker
from training.config import ConfigError, TrainConfig

pytestmark = pytest.mark.slow
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")


def aekit_train(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "aekit_cli", "train", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def results(stdout: str) -> dict[str, dict]:
    """The JSON result line each worker prints, by worker prefix."""
    found = {}
    for line in stdout.splitlines():
        prefix, _, rest = line.partition("] ")
        if rest.startswith("{"):
            found[prefix.strip("[")] = json.loads(rest)
    return found


def checkpoint_weights(workdir):
    reader = tf.train.load_checkpoint(str(workdir / "checkpoints"))
    # the model's weights are saved under the path the checkpoint reaches them first: the optimizer's list
    names = sorted(n for n in reader.get_variable_to_shape_map()
                   if n.startswith("optimizer/_trainable_variables/") and "OPTIMIZER_SLOT" not in n)
    return {n: reader.get_tensor(n) for n in names}


def test_two_workers_agree_and_match_one_process(tmp_path):
    common = ["--smoke", "--model", "dense", "--seed", "3", "--dataset", "mnist-sample"]
    multi = aekit_train("--multiworker-local", "2", *common, "--workdir", str(tmp_path / "mw"),
                        "--model-base-path", str(tmp_path / "models"))
    assert multi.returncode == 0, multi.stderr[-3000:]
    by_worker = results(multi.stdout)
    assert set(by_worker) == {"worker-0", "worker-1"}
    assert by_worker["worker-0"]["weights_sha256"] == by_worker["worker-1"]["weights_sha256"]
    assert by_worker["worker-0"]["step"] == by_worker["worker-1"]["step"] == 8
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["1"]  # only the chief exports
    assert "export" in by_worker["worker-0"] and "export" not in by_worker["worker-1"]
    assert not list((tmp_path / "mw").glob(".scratch-*"))  # other workers' checkpoint copies are gone

    single = aekit_train(*common, "--workdir", str(tmp_path / "one"), "--no-export")
    assert single.returncode == 0, single.stderr[-3000:]
    multi_w, single_w = checkpoint_weights(tmp_path / "mw"), checkpoint_weights(tmp_path / "one")
    assert multi_w.keys() == single_w.keys() and multi_w
    # Same global batches (see data.make_dataset): only the all-reduce's summation order differs.
    for name in multi_w:
        np.testing.assert_allclose(multi_w[name], single_w[name], atol=1e-4, err_msg=name)


def test_two_workers_on_shards_match_one_process_on_the_same_global_batches(tmp_path):
    from training import convert

    convert.convert("mnist-sample", str(tmp_path / "shards"), shards=4)
    common = ["--smoke", "--model", "dense", "--seed", "3", "--noise-factor", "0.3", "--input-groups", "2",
              "--dataset", f"tfrecord:{tmp_path / 'shards'}", "--no-export"]
    multi = aekit_train("--multiworker-local", "2", *common, "--workdir", str(tmp_path / "mw"))
    assert multi.returncode == 0, multi.stderr[-3000:]
    by_worker = results(multi.stdout)
    assert by_worker["worker-0"]["weights_sha256"] == by_worker["worker-1"]["weights_sha256"]
    single = aekit_train(*common, "--workdir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-3000:]
    multi_w, single_w = checkpoint_weights(tmp_path / "mw"), checkpoint_weights(tmp_path / "one")
    assert multi_w.keys() == single_w.keys() and multi_w
    # Worker i streams files i and i + 2 (tests/test_data.py checks which rows); one process with
    # --input-groups 2 builds the same two streams and concatenates them: the same global batches.
    for name in multi_w:
        np.testing.assert_allclose(multi_w[name], single_w[name], atol=1e-4, err_msg=name)
    history = json.loads((tmp_path / "mw" / "history.json").read_text())
    single_history = json.loads((tmp_path / "one" / "history.json").read_text())
    assert abs(history[-1]["mse"] - single_history[-1]["mse"]) < 1e-5  # each worker scored half the test split


def _config_file(tmp_path, **values) -> str:
    cfg = TrainConfig(model="dense", max_examples=512, batch_size=16, epochs=8, checkpoint_every_steps=8,
                      workdir=str(tmp_path / "run"), model_base_path=str(tmp_path / "models"), **values)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.__dict__))
    return str(path)


def _wait_for_checkpoint(workdir, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tf.train.latest_checkpoint(str(workdir / "checkpoints")):
            return
        time.sleep(0.2)
    raise TimeoutError("no checkpoint written")


def _finish_and_check(config, tmp_path):
    restarted = aekit_train("--multiworker-local", "2", "--config", config)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "resuming at step 0" not in restarted.stdout
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 9))  # no epoch lost or run twice
    assert history[-1]["step"] == 8 * 32


def test_dead_worker_fails_the_job_clearly_and_a_restart_resumes(tmp_path):
    config = _config_file(tmp_path, collective_timeout_seconds=30)
    cluster = multiworker.local_cluster(2)
    procs = []
    for index in range(2):
        env = dict(ENV, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(multiworker.worker_command(config), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        _wait_for_checkpoint(tmp_path / "run")
        procs[1].kill()
        started = time.monotonic()
        _, stderr = procs[0].communicate(timeout=150)
        assert procs[0].returncode == 1
        assert "a peer worker failed or is unreachable" in stderr and "restart the job to resume" in stderr
        assert "Traceback" not in stderr
        assert time.monotonic() - started < 150
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    _finish_and_check(config, tmp_path)


def test_sigterm_saves_on_every_worker_and_the_rerun_resumes(tmp_path):
    config = _config_file(tmp_path)
    launcher = subprocess.Popen([sys.executable, "-m", "aekit_cli", "train", "--multiworker-local", "2",
                                 "--config", config], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    try:
        _wait_for_checkpoint(tmp_path / "run")
        launcher.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 143, output[-3000:]
    assert output.count("checkpoint saved, rerun to resume") == 2  # both workers stopped at the same step
    saved = tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints"))
    assert int(saved.rsplit("-", 1)[1]) < 8 * 32
    _finish_and_check(config, tmp_path)


def test_indexed_job_tf_config():
    env = {"JOB_COMPLETION_INDEX": "2"}
    config = multiworker.set_tf_config_from_indexed_job(3, "aekit-train-{index}.aekit-train", 2222, env)
    assert config == {"cluster": {"worker": ["aekit-train-0.aekit-train:2222", "aekit-train-1.aekit-train:2222",
                                             "aekit-train-2.aekit-train:2222"]},
                      "task": {"type": "worker", "index": 2}}
    assert json.loads(env["TF_CONFIG"]) == config


@pytest.mark.parametrize("call, message", [
    (lambda: multiworker.set_tf_config_from_indexed_job(3, "w-{index}", 2222, {}), "JOB_COMPLETION_INDEX"),
    (lambda: multiworker.set_tf_config_from_indexed_job(3, "w", 2222, {"JOB_COMPLETION_INDEX": "0"}), "{index}"),
    (lambda: multiworker.set_tf_config_from_indexed_job(2, "w-{index}", 2222, {"JOB_COMPLETION_INDEX": "5"}),
     "outside 0..1"),
    (lambda: multiworker.set_tf_config_from_indexed_job(None, None, 2222, {}), "--num-workers"),
    (lambda: multiworker.run_local_workers(1, TrainConfig()), "at least 2"),
])
def test_bad_cluster_settings(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


@pytest.mark.parametrize("seconds", [0.5, 1.0, 6.0, 30.0, 300.0])
def test_the_heartbeat_finds_a_silent_peer_before_any_collective_gives_up(seconds):
    # A collective's own timer firing first crashed the cut-off worker (issue 19); the heartbeat
    # reports up to ~2 s after its timeout, so the timer must come later by more than that.
    heartbeat = distribute.heartbeat_timeout_seconds(seconds)
    assert seconds < heartbeat and distribute.collective_backstop_seconds(seconds) >= heartbeat + 10


def test_a_worker_killed_by_a_signal_gives_the_shells_status_and_one_line(capsys):
    # Real processes standing in for workers: the supervisor only sees their exit.
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    procs[1].kill()
    assert multiworker._supervise(procs) == 128 + signal.SIGKILL
    assert capsys.readouterr().err.strip() == ("aekit: error: worker-1 was killed by SIGKILL (exit status 137); "
                                               "stopped the others")
    assert all(p.poll() is not None for p in procs)
