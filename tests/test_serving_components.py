"""The embedded server's machinery in-process: versions, policies, reload, batching, warmup, health."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
from tensorflow_serving.config import file_system_storage_path_source_pb2, model_server_config_pb2

from serving import config_files
from serving import servable as servable_module
from serving.batching import BatchingOptions, BatchScheduler
from serving.core import DataPlane
from serving.errors import ServingError
from serving.grpc_server import GrpcServer
from serving.manager import ModelManager, State, aspired_versions
from serving.servable import Servable
from serving.tensors import ndarray_to_proto, proto_to_ndarray
from tests.model_fixtures import write_corrupt, write_tf2
from training.multiworker import free_ports


@pytest.fixture(scope="module")
def model_versions(tmp_path_factory):
    """Versions 1, 2, 3 of half_plus_two with b = 2, 3, 4 (so answers tell versions apart)."""
    root = tmp_path_factory.mktemp("versions")
    for version in (1, 2, 3):
        write_tf2(root / str(version), b=1.0 + version)
    return root


def make_base(tmp_path, model_versions, versions):
    base = tmp_path / "model"
    base.mkdir()
    for v in versions:
        shutil.copytree(model_versions / str(v), base / str(v))
    return base


def config(base, policy=None, labels=None, name="m"):
    cfg = model_server_config_pb2.ModelServerConfig()
    model = cfg.model_config_list.config.add(name=name, base_path=str(base), model_platform="tensorflow")
    if policy:
        model.model_version_policy.CopyFrom(policy)
    for k, v in (labels or {}).items():
        model.version_labels[k] = v
    return cfg


def predict_y(core, x=2.0, **spec):
    _, out = core.predict(model_pb2.ModelSpec(name="m", **spec), {"x": np.array([[x]], np.float32)})
    return float(out["y"][0, 0])


Policy = file_system_storage_path_source_pb2.FileSystemStoragePathSourceConfig.ServableVersionPolicy


@pytest.mark.parametrize("policy, expected", [
    (Policy(), {3}),
    (Policy(latest=Policy.Latest(num_versions=2)), {2, 3}),
    (Policy(all=Policy.All()), {1, 2, 3}),
    (Policy(specific=Policy.Specific(versions=[1, 3, 9])), {1, 3}),
])
def test_version_policies(policy, expected):
    assert aspired_versions(policy, [1, 2, 3]) == expected


def test_new_version_is_picked_up_and_removed_version_dropped(tmp_path, model_versions):
    base = make_base(tmp_path, model_versions, [1])
    manager = ModelManager()
    manager.reload(config(base))
    core = DataPlane(manager)
    assert predict_y(core) == 3.0
    shutil.copytree(model_versions / "2", base / "2")
    manager.poll()
    assert predict_y(core) == 4.0
    assert [s.state for s in manager.status("m")] == [State.AVAILABLE, State.END]
    shutil.rmtree(base / "2")
    manager.poll()
    assert predict_y(core) == 3.0


def test_corrupt_version_never_replaces_the_served_one(tmp_path, model_versions):
    base = make_base(tmp_path, model_versions, [1])
    manager = ModelManager(max_load_retries=0)  # fails for good at once
    manager.reload(config(base))
    write_corrupt(base / "2")
    manager.poll()
    core = DataPlane(manager)
    assert predict_y(core) == 3.0  # still version 1
    states = {s.version: s for s in manager.status("m")}
    assert states[2].state == State.END and "saved_model.pb" in states[2].error.message
    assert states[1].state == State.AVAILABLE
    with pytest.raises(ServingError) as info:
        manager.resolve("m", version=2)
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_reload_replaces_the_model_set_and_checks_labels(tmp_path, model_versions):
    base = make_base(tmp_path, model_versions, [1, 2])
    manager = ModelManager()
    manager.reload(config(base, Policy(all=Policy.All()), {"stable": 1}))
    core = DataPlane(manager)
    assert predict_y(core, version_label="stable") == 3.0
    manager.reload(config(base, name="other"))
    with pytest.raises(ServingError, match=r"Latest\(m\)"):
        manager.resolve("m")
    assert manager.resolve("other").version == 2
    with pytest.raises(ServingError, match="not currently available"):
        manager.reload(config(base, labels={"stable": 1}))  # latest policy: version 1 is not loaded


def test_a_model_still_loading_is_unavailable_not_missing(tmp_path, model_versions):
    base = make_base(tmp_path, model_versions, [1])
    manager = ModelManager()
    manager.configure(config(base))  # configured, not loaded yet: clients should retry, not give up
    with pytest.raises(ServingError) as info:
        manager.resolve("m")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ServingError) as info:
        manager.resolve("other")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    manager.start_polling(0)
    assert manager.initial_load_done.wait(60) and manager.resolve("m").version == 1


def test_request_in_flight_survives_unload(tmp_path, model_versions):
    base = make_base(tmp_path, model_versions, [1])
    manager = ModelManager()
    manager.reload(config(base))
    servable = manager.resolve("m")
    manager.reload(config(base, name="other"))  # unloads m
    core = DataPlane(manager)
    _, out = core.predict(model_pb2.ModelSpec(name="m"), {"x": np.ones((1, 1), np.float32)}, servable=servable)
    assert out["y"].tolist() == [[2.5]]


def test_batching_gives_each_caller_its_own_rows(tmp_path, model_versions):
    base = make_base(tmp_path, model_versions, [1])
    manager = ModelManager()
    manager.reload(config(base))
    batches = []
    options = BatchingOptions(max_batch_size=8, batch_timeout_micros=20000, num_batch_threads=1,
                              allowed_batch_sizes=(4, 8))
    core = DataPlane(manager, batcher=BatchScheduler(options, lambda rows, padded, queued: batches.append((rows, padded))))
    xs = np.arange(40, dtype=np.float32)
    with futures.ThreadPoolExecutor(16) as pool:
        ys = list(pool.map(lambda x: predict_y(core, float(x)), xs))
    assert ys == (0.5 * xs + 2).tolist()
    assert max(rows for rows, _ in batches) > 1, batches
    assert all(padded in (4, 8) and padded >= rows for rows, padded in batches)


def test_batch_queue_full_is_unavailable_and_oversized_is_invalid():
    release = threading.Event()

    def slow(inputs):
        release.wait(10)
        return inputs

    scheduler = BatchScheduler(BatchingOptions(max_batch_size=2, max_enqueued_batches=1, num_batch_threads=1))
    row = {"x": np.ones((2, 1), np.float32)}
    with futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(scheduler.run, "k", row, slow)
        time.sleep(0.3)  # the worker is now blocked inside `slow`
        second = pool.submit(scheduler.run, "k", row, slow)
        time.sleep(0.3)  # second waits in the queue's one slot
        with pytest.raises(ServingError) as info:
            scheduler.run("k", row, slow)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        release.set()
        assert first.result().keys() == second.result().keys() == {"x"}
    with pytest.raises(ServingError, match="larger than maximum input batch size 2"):
        scheduler.run("k", {"x": np.ones((3, 1), np.float32)}, slow)
    scheduler.stop()


def test_async_callers_get_their_rows_and_a_deadline_while_waiting():
    calls, release, loop_closed = [], threading.Event(), threading.Event()

    def double(inputs):
        release.wait(10)
        calls.append(len(inputs["x"]))
        return {"y": inputs["x"] * 2}

    def after_the_loop_closed(inputs):
        loop_closed.wait(10)
        return double(inputs)

    scheduler = BatchScheduler(BatchingOptions(max_batch_size=16, batch_timeout_micros=50_000, num_batch_threads=1))

    async def callers():
        rows = [{"x": np.full((1, 1), i, np.float32)} for i in range(8)]
        waiting = [asyncio.ensure_future(scheduler.run_async("k", r, double, timeout=10)) for r in rows]
        late = asyncio.ensure_future(scheduler.run_async("late", rows[0], after_the_loop_closed, timeout=0.2))
        with pytest.raises(ServingError) as info:
            await late  # its batch cannot run while the worker is held in `double`
        release.set()
        return [float(out["y"][0, 0]) for out in await asyncio.gather(*waiting)], info.value.code

    answers, code = asyncio.run(callers())
    assert answers == [2.0 * i for i in range(8)] and code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert calls[0] == 8  # the eight concurrent callers shared one model call
    loop_closed.set()  # the timed-out batch now finishes for a loop that is gone ...
    # ... and the batch thread lives on
    assert scheduler.run("k", {"x": np.ones((1, 1), np.float32)}, double, timeout=5)["y"].tolist() == [[2.0]]
    scheduler.stop()


def test_batching_options_from_tf_serving_text(tmp_path):
    path = tmp_path / "batching.config"
    path.write_text("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 500 }\n"
                    "num_batch_threads { value: 2 }\nallowed_batch_sizes: 16\nallowed_batch_sizes: 64\n")
    options = BatchingOptions.from_proto(config_files.parse_text(path, config_files.BatchingParameters))
    assert (options.max_batch_size, options.batch_timeout_micros, options.num_batch_threads,
            options.allowed_batch_sizes, options.max_enqueued_batches) == (64, 500, 2, (16, 64), 10)
    path.write_text("max_batch_size { value: 64 }\nallowed_batch_sizes: 16\n")
    with pytest.raises(ValueError, match="end with max_batch_size"):
        BatchingOptions.from_proto(config_files.parse_text(path, config_files.BatchingParameters))
    path.write_text("max_batch_sizes: 3")
    with pytest.raises(config_files.ConfigFileError, match="Error parsing text-format tensorflow.serving.BatchingParameters"):
        config_files.parse_text(path, config_files.BatchingParameters)


def write_warmup(version_dir, records):
    import tensorflow as tf

    path = version_dir / "assets.extra" / "tf_serving_warmup_requests"
    path.parent.mkdir()
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)


def warmup_record(alias="x"):
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="m"))
    request.inputs[alias].CopyFrom(ndarray_to_proto(np.ones((1, 1), np.float32)))
    return prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString()


def test_warmup_replays_records_before_available_and_bad_warmup_fails_the_load(tmp_path, model_versions):
    base = make_base(tmp_path, model_versions, [1, 2])
    write_warmup(base / "1", [warmup_record()] * 3)
    write_warmup(base / "2", [warmup_record("wrong_alias")])
    replayed = []
    manager = ModelManager(max_load_retries=0)  # fails for good at once
    core = DataPlane(manager)
    manager.warmup = lambda servable: replayed.append(core.warmup(servable))
    manager.reload(config(base, Policy(all=Policy.All())))
    assert replayed[0] == 3
    states = {s.version: s for s in manager.status("m")}
    assert states[1].state == State.AVAILABLE
    assert states[2].state == State.END and "warmup record 0" in states[2].error.message


def test_health_is_not_serving_until_models_load(tmp_path, model_versions):
    base = make_base(tmp_path, model_versions, [1])
    manager = ModelManager()
    core = DataPlane(manager)
    manager.configure(config(base))
    (port,) = free_ports(1)
    server = GrpcServer(core, [f"127.0.0.1:{port}"], [], 4, True)
    manager.on_event = server.health.update
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            check = lambda: stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status  # noqa: E731
            assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
            manager.start_polling(0)
            manager.initial_load_done.wait(60)
            assert check() == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


def test_tensor_proto_roundtrip_both_encodings():
    import tensorflow as tf

    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert proto_to_ndarray(ndarray_to_proto(value)).tolist() == value.tolist()
    typed = tf.make_tensor_proto(value.tolist(), dtype=tf.float32)  # float_val, not tensor_content
    typed.ClearField("tensor_content")
    typed.float_val.extend(value.ravel().tolist())
    assert proto_to_ndarray(typed).tolist() == value.tolist()
    strings = proto_to_ndarray(ndarray_to_proto(np.array([b"a", b"bc"], dtype=object)))
    assert strings.tolist() == [b"a", b"bc"]
    response = predict_pb2.PredictResponse()  # written in place, as the gRPC adapter does
    ndarray_to_proto(value, out=response.outputs["y"])
    ndarray_to_proto(np.array([b"a", b"bc"], dtype=object), out=response.outputs["s"])
    assert proto_to_ndarray(response.outputs["y"]).tolist() == value.tolist()
    assert proto_to_ndarray(response.outputs["s"]).tolist() == [b"a", b"bc"]


class TwoInputs(tf.Module):
    """Parameters declared (z, a) but sorted (a, z): a swapped order would change the answer."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="z"),
                                  tf.TensorSpec([None], tf.float32, name="a")])
    def difference(self, z, a):
        return {"d": z - 10.0 * a}


def test_signature_runs_match_the_plain_signature_call(tmp_path, model_versions):
    module_dir = tmp_path / "two" / "1"
    module = TwoInputs()
    tf.saved_model.save(module, str(module_dir), signatures={"serving_default": module.difference})
    inputs = {"a": np.array([1.0, 2.0], np.float32), "z": np.array([5.0, 7.0], np.float32)}
    cases = [(module_dir, "serving_default", inputs, "d"),
             (model_versions / "1", "serving_default", {"x": np.array([[3.0]], np.float32)}, "y")]
    for version_dir, name, values, output in cases:
        plain = tf.saved_model.load(str(version_dir)).signatures[name]
        want = plain(**{k: tf.constant(v) for k, v in values.items()})[output].numpy()
        got = Servable("m", 1, version_dir).run(name, values, [output])[output]
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, [[3.5]])

    class NotAGraphFunction:  # e.g. another TF version's signature object: the plain call is used
        def __call__(self, **inputs):
            return {"d": inputs["z"] - inputs["a"]}

    signature = Servable("m", 1, module_dir).signature_defs["serving_default"]
    call = servable_module._caller(NotAGraphFunction(), signature)
    assert call({"z": 3.0, "a": 1.0}) == {"d": 2.0}
