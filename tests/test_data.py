"""Input pipeline: every source, the fixed split, scaling, noise, sharding, and each bad input's error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from training import data, records, train
from training.config import ConfigError, TrainConfig


def test_mnist_sample_split_is_fixed_4000_1000_and_shuffled():
    a = data.load_arrays("mnist-sample")
    b = data.load_arrays("mnist-sample")
    assert a.x_train.shape == (4000, 28, 28, 1) and a.x_test.shape == (1000, 28, 28, 1)
    assert a.x_train.dtype == np.uint8
    np.testing.assert_array_equal(a.y_test, b.y_test)  # same split in every command
    assert len(np.unique(a.y_test)) == 10  # shuffled before splitting (the source is sorted by class)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A real prepared TFDS dataset (TFDS's own DummyMnist builder: generated offline, ~10 s)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds.testing.DummyMnist(data_dir=data_dir).download_and_prepare()
    return data_dir


@pytest.mark.slow
def test_tfds_is_streamed_from_its_own_shard_files(tfds_dir):
    source = data.load_source("tfds:dummy_mnist", data_dir=tfds_dir)
    assert source.input_shape == (28, 28, 1) and source.train.count == 20 and not source.train.in_memory
    assert all(f.startswith(tfds_dir) and ".tfrecord" in f for f in source.train.files)
    builder = tfds.builder("dummy_mnist", data_dir=tfds_dir)
    expected = np.stack([e["image"] for e in tfds.as_numpy(builder.as_dataset(split="train"))])
    streamed = np.concatenate([c.numpy() for _, c in data.eval_dataset(source.train, 8)])
    np.testing.assert_array_equal(np.sort((streamed * 255).round().astype(np.uint8).reshape(20, -1), axis=0),
                                  np.sort(expected.reshape(20, -1), axis=0))  # decoded PNGs, exact pixels


def test_tfds_missing_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="--download"):
        data.load_source("tfds:mnist", data_dir=str(tmp_path))


def test_npz_source(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((10, 8, 8), np.uint8), y_train=np.arange(10),
             x_test=np.full((4, 8, 8), 255, np.uint8), y_test=np.arange(4))
    arrays = data.load_arrays(f"npz:{path}")
    assert arrays.x_train.shape == (10, 8, 8, 1) and arrays.input_shape == (8, 8, 1)
    np.savez(path, images=np.zeros((3, 2)))
    with pytest.raises(ConfigError, match="lacks arrays"):
        data.load_arrays(f"npz:{path}")


def test_image_folder_with_class_subfolders(tmp_path):
    for label in ("cats", "dogs"):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / label / f"{i}.png")
    arrays = data.load_arrays(str(tmp_path))
    assert len(arrays.x_train) + len(arrays.x_test) == 10
    assert arrays.input_shape == (8, 8, 1)
    assert set(np.concatenate([arrays.y_train, arrays.y_test])) == {0, 1}


def test_image_folder_mixed_shapes(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ConfigError, match="mixed shapes"):
        data.load_arrays(str(tmp_path))


def test_npy_vectors_and_range_check(tmp_path):
    path = tmp_path / "tab.npy"
    np.save(path, np.random.default_rng(0).random((50, 6)).astype(np.float32))
    arrays = data.load_arrays(str(path))
    assert arrays.input_shape == (6,) and len(arrays.x_test) == 10
    np.save(path, np.full((5, 3), 7.0))
    with pytest.raises(ConfigError, match=r"values in \[7, 7\]; expected \[0, 1\]"):
        data.load_arrays(str(path))
    np.save(path, np.zeros((5, 3, 3)))
    with pytest.raises(ConfigError, match="must be \\(N, D\\)"):
        data.load_arrays(str(path))


@pytest.mark.parametrize("source, message", [
    ("imagenet-please", "unknown dataset"),
    ("tfrecord:/nope/*.tfrecord", "matches no files"),
    ("missing/dir", "does not exist"),
    ("npz:/nope.npz", "does not exist"),
    ("/nope.npy", "does not exist"),
])
def test_bad_sources(source, message):
    with pytest.raises(ConfigError, match=message):
        data.load_source(source)


def test_empty_dataset(tmp_path):
    path = tmp_path / "e.npz"
    np.savez(path, x_train=np.zeros((0, 4, 4), np.uint8), x_test=np.zeros((0, 4, 4), np.uint8))
    with pytest.raises(ConfigError, match="empty"):
        data.load_arrays(f"npz:{path}")


def test_scale_and_noise_eager_and_in_tf_data():
    x = np.array([[0, 128, 255]], np.uint8)
    np.testing.assert_allclose(data.scale_to_unit(tf.constant(x)).numpy(), [[0.0, 128 / 255, 1.0]])
    noisy, target = next(iter(data.make_dataset(np.full((8, 5), 128, np.uint8), 4, noise_factor=0.4)))
    assert float(tf.reduce_min(noisy)) >= 0.0 and float(tf.reduce_max(noisy)) <= 1.0  # clipped
    assert not np.allclose(noisy.numpy(), 128 / 255) and np.allclose(target.numpy(), 128 / 255)
    ds = data.make_dataset(np.full((16, 3), 128, np.uint8), 4, noise_factor=0.3, seed=1)
    noisy, clean = next(iter(ds))
    assert noisy.shape == (4, 3) and noisy.dtype == tf.float32
    again, _ = next(iter(data.make_dataset(np.full((16, 3), 128, np.uint8), 4, noise_factor=0.3, seed=1)))
    np.testing.assert_array_equal(noisy.numpy(), again.numpy())  # seeded: a resumed run sees the same batches
    skipped, _ = next(iter(data.make_dataset(np.full((16, 3), 128, np.uint8), 4, noise_factor=0.3, seed=1,
                                             skip_batches=1)))
    second, _ = list(data.make_dataset(np.full((16, 3), 128, np.uint8), 4, noise_factor=0.3, seed=1).take(2))[1]
    np.testing.assert_array_equal(skipped.numpy(), second.numpy())



def test_noise_drawn_in_the_step_equals_the_pipelines_on_every_replica():
    """The trainer's batches (rows as stored + noise keys, noise drawn by data.add_noise on each
    replica) give exactly the noisy rows the pipeline itself makes, however the batch is split."""
    x = np.random.default_rng(0).integers(0, 256, (64, 4, 4, 1), dtype=np.uint8)
    made_here = next(iter(data.make_dataset(x, 16, noise_factor=0.3, seed=5)))
    keys, stored = next(iter(data.make_dataset(x, 16, noise_factor=0.3, seed=5, noise_in_step=True)))
    assert stored.dtype == tf.uint8 and keys.shape == (16, 3)  # 1 byte per pixel to the device
    for a, b in zip(data.add_noise(keys, stored, 0.3), made_here):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    parts = []
    for pipeline in range(2):  # 2 workers x 2 replicas: each replica's quarter of the global batch
        context = tf.distribute.InputContext(2, pipeline, 4)
        for keys, stored in data.make_dataset(x, 16, noise_factor=0.3, seed=5, input_context=context,
                                              noise_in_step=True).take(2):
            parts.append(data.add_noise(keys, stored, 0.3)[0].numpy())
    np.testing.assert_array_equal(np.concatenate(parts), made_here[0].numpy())

def test_gaussian_noise_is_standard_normal_and_seeded():
    seed = tf.constant([3, 1], tf.int64)
    z = data.gaussian_noise(tf.constant([101, 999]), seed).numpy()  # odd count: one pair half used
    assert z.shape == (101, 999) and z.dtype == np.float32 and np.isfinite(z).all()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    # Shape of the distribution, not just its first two moments: normal tail masses and kurtosis.
    assert abs(np.mean(np.abs(z) > 1.96) - 0.05) < 0.003 and abs(np.mean(np.abs(z) > 3) - 0.0027) < 0.001
    assert abs(np.mean(z ** 4) / z.var() ** 2 - 3) < 0.1
    assert abs(np.corrcoef(z.ravel()[:-1], z.ravel()[1:])[0, 1]) < 0.01  # neighbours independent
    np.testing.assert_array_equal(z, data.gaussian_noise(tf.constant([101, 999]), seed).numpy())
    assert not np.allclose(z, data.gaussian_noise(tf.constant([101, 999]), tf.constant([3, 2], tf.int64)).numpy())


def test_input_context_takes_its_rows_of_each_global_batch():
    x = np.arange(32, dtype=np.uint8).reshape(32, 1)
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=4)
    batches = [(b[0].numpy() * 255).round().astype(int).ravel().tolist()
               for b in data.make_dataset(x, 16, input_context=context, training=False).take(2)]
    assert batches == [[8, 9, 10, 11], [12, 13, 14, 15]]  # global 16 over 4 replicas; pipeline 1 of 2


def test_replicas_together_see_exactly_the_single_device_batch():
    x = np.arange(64, dtype=np.uint8).reshape(64, 1)

    def rows(context):
        ds = data.make_dataset(x, 16, noise_factor=0.2, seed=3, input_context=context)
        replicas_here = context.num_replicas_in_sync // context.num_input_pipelines if context else 1
        return [b[0].numpy() for b in ds.take(replicas_here)]  # one step's batches

    single = rows(None)[0]
    workers = [tf.distribute.InputContext(2, i, 4) for i in range(2)]
    union = np.concatenate([np.concatenate(rows(c)) for c in workers])
    np.testing.assert_array_equal(np.sort(union.ravel()), np.sort(single.ravel()))  # same rows, same noise


def test_batch_that_does_not_split_over_replicas_is_an_error():
    context = tf.distribute.InputContext(1, 0, 3)
    with pytest.raises(ValueError, match="divisible"):
        data.make_dataset(np.zeros((32, 1), np.uint8), 16, input_context=context)


def test_steps_per_epoch_refuses_a_batch_larger_than_the_data():
    assert data.steps_per_epoch(100, 32) == 3
    with pytest.raises(ConfigError, match="lower --batch-size"):
        data.steps_per_epoch(10, 32)


def test_object_and_garbage_npy_and_corrupt_images_are_one_clear_line(tmp_path):
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match=r"Python objects \(dtype=object\)"):
        data.load_source(str(objects))
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"this is not numpy at all" * 10)
    with pytest.raises(ConfigError, match="is not a numeric NumPy file"):
        data.load_source(str(garbage))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ConfigError, match="broken.png is corrupt"):
        data.load_source(str(tmp_path))


def test_in_memory_data_is_not_embedded_in_the_graph():
    x = np.random.default_rng(0).integers(0, 255, (4000, 28, 28, 1), np.uint8)  # 3 MB of pixels
    ds = data.make_dataset(x, 64, noise_factor=0.2)
    policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    graph = ds._as_serialized_graph(external_state_policy=policy).numpy()  # what tf.data ships and checks
    assert len(graph) < 100_000  # from_tensor_slices / tf.constant would put x.nbytes (3.1 MB) here


def test_noise_rows_are_drawn_alone_and_match_the_whole_batch():
    seed = tf.constant([5, 2], tf.int64)
    whole = data.gaussian_noise(tf.constant([8, 3, 5]), seed).numpy()
    rows = data.gaussian_noise(tf.constant([3, 3, 5]), seed, first_row=4).numpy()
    np.testing.assert_array_equal(rows, whole[4:7])


def write_shards(folder, files: int, per_file: int) -> list[str]:
    """TFRecord files whose examples hold their file's index in every pixel (to see who read what)."""
    paths_ = []
    for f in range(files):
        path = str(folder / f"part-{f}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for _ in range(per_file):
                writer.write(records.image_example(np.full((2, 2, 1), f, np.uint8), label=f))
        paths_.append(path)
    return paths_


def file_split(files):
    fmt = records.RecordFormat("image", (2, 2, 1))
    return data.Split(0, files=tuple(files), fmt=fmt)


def values_of(ds, steps):
    return [np.unique((b[1].numpy() * 255).round()).astype(int).tolist() for b in ds.take(steps)]


def test_workers_on_shards_read_disjoint_files_and_together_equal_one_process(tmp_path):
    split = file_split(write_shards(tmp_path, 4, 16))
    one = [b[0].numpy() for b in data.make_dataset(split, 8, noise_factor=0.3, seed=1, input_groups=2).take(6)]
    workers = [tf.distribute.InputContext(2, i, 2) for i in range(2)]
    parts = [data.make_dataset(split, 8, noise_factor=0.3, seed=1, input_context=c).take(6) for c in workers]
    for i, ds in enumerate(parts):
        assert set(sum(values_of(ds, 6), [])) <= {i, i + 2}  # worker i reads files i and i + 2 only
    for step, (a, b) in enumerate(zip(*parts)):
        np.testing.assert_array_equal(np.concatenate([a[0], b[0]]), one[step])  # same rows, same noise
    resumed = data.make_dataset(split, 8, noise_factor=0.3, seed=1, input_groups=2, skip_batches=4)
    np.testing.assert_array_equal(next(iter(resumed))[0].numpy(), one[4])


def test_fewer_files_than_workers_falls_back_to_every_nth_record(tmp_path):
    split = file_split(write_shards(tmp_path, 1, 32))
    contexts = [tf.distribute.InputContext(2, i, 2) for i in range(2)]
    rows = [np.concatenate([b[1].numpy() for b in data.make_dataset(split, 8, input_context=c, training=False)])
            for c in contexts]
    assert len(rows[0]) == len(rows[1]) == 16  # each keeps every other record of the one file
    with pytest.raises(ConfigError, match="divide the global batch"):
        data.make_dataset(split, 9, input_groups=2)


def test_convert_round_trip_is_exact(tmp_path):
    from training import convert

    source = data.load_arrays("mnist-sample")
    metadata = convert.convert("mnist-sample", str(tmp_path / "shards"), shards=4)
    assert metadata["splits"]["train"]["count"] == 4000 and metadata["splits"]["test"]["count"] == 1000
    assert metadata["shape"] == [28, 28, 1] and metadata["dtype"] == "uint8"
    assert metadata["split_seed"] == data.SPLIT_SEED
    assert len(list((tmp_path / "shards").glob("train-*.tfrecord"))) == 4
    back = data.to_arrays(data.load_source(f"tfrecord:{tmp_path / 'shards'}"))
    for name in ("train", "test"):
        want, got = getattr(source, f"x_{name}"), getattr(back, f"x_{name}")
        order_w = np.lexsort(want.reshape(len(want), -1).T)
        order_g = np.lexsort(got.reshape(len(got), -1).T)
        np.testing.assert_array_equal(got[order_g], want[order_w])  # the same examples, bit for bit
        np.testing.assert_array_equal(getattr(back, f"y_{name}")[order_g], getattr(source, f"y_{name}")[order_w])
    with pytest.raises(ConfigError, match="already holds a converted dataset"):
        convert.convert("mnist-sample", str(tmp_path / "shards"), shards=4)


def test_convert_classes_keeps_those_labels_of_any_source_and_refuses_a_missing_one(tmp_path):
    from training import convert

    source = data.load_arrays("mnist-sample")
    convert.convert("mnist-sample", str(tmp_path / "all"), shards=4)
    for name, dataset in (("from-memory", "mnist-sample"), ("from-shards", f"tfrecord:{tmp_path / 'all'}")):
        metadata = convert.convert(dataset, str(tmp_path / name), shards=4, classes=(1, 7))
        assert metadata["classes"] == [1, 7]
        for split in ("train", "test"):
            want = np.isin(getattr(source, f"y_{split}"), (1, 7))
            assert metadata["splits"][split]["count"] == int(want.sum())
        back = data.to_arrays(data.load_source(f"tfrecord:{tmp_path / name}"))
        assert sorted(set(back.y_train.tolist())) == [1, 7] and len(back.x_test) == np.isin(source.y_test, (1, 7)).sum()
        np.testing.assert_array_equal(np.sort(back.x_train.reshape(len(back.x_train), -1).sum(1)),
                                      np.sort(source.x_train[np.isin(source.y_train, (1, 7))]
                                              .reshape(-1, 784).sum(1, dtype=np.int64)))
    with pytest.raises(ConfigError, match="--classes 1,11: mnist-sample has no train examples of class 11"):
        convert.convert("mnist-sample", str(tmp_path / "none"), shards=4, classes=(1, 11))
    assert not (tmp_path / "none" / "metadata.json").exists()


def test_the_cli_converts_one_class_and_refuses_bad_classes_in_one_line(tmp_path, capsys):
    import aekit_cli

    out = tmp_path / "threes"
    assert aekit_cli.main(["data", "convert", "--dataset", "mnist-sample", "--output", str(out), "--classes", "3"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    y = data.load_arrays("mnist-sample")
    assert (counts["train"], counts["test"]) == (int((y.y_train == 3).sum()), int((y.y_test == 3).sum()))
    for bad in ("3,x", ","):
        assert aekit_cli.main(["data", "convert", "--dataset", "mnist-sample", "--output", str(tmp_path / "bad"),
                               "--classes", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("aekit: error: --classes "), err
        assert not (tmp_path / "bad" / "metadata.json").exists()


def test_convert_vectors_to_ram_and_a_glob_source(tmp_path):
    from training import convert

    path = tmp_path / "tab.npy"
    np.save(path, np.random.default_rng(0).random((50, 6)).astype(np.float32))
    convert.convert(str(path), "ram://converted/tab", shards=3)
    source = data.load_source("tfrecord:ram://converted/tab")
    assert source.input_shape == (6,) and source.train.count == 40
    glob = data.load_source("tfrecord:ram://converted/tab/train-*.tfrecord")  # split by file
    assert glob.train.count + glob.test.count == 40 and len(glob.test.files) == 1


def test_random_shift_moves_each_image_by_whole_pixels_alike_on_any_split():
    rows = 400
    dot = np.zeros((rows, 9, 9, 1), np.float32)
    dot[:, 4, 4, 0] = 1.0  # one lit pixel: where it lands is the shift
    moved = data.random_shift(tf.constant(dot), data.noise_keys(7, tf.constant(3), 0, rows), 2).numpy()
    assert np.all(moved.sum(axis=(1, 2, 3)) == 1.0)  # moved whole, not interpolated or lost
    offsets = np.array([np.argwhere(m[..., 0] == 1.0)[0] for m in moved]) - 4
    for axis in (0, 1):
        values, counts = np.unique(offsets[:, axis], return_counts=True)
        assert values.tolist() == [-2, -1, 0, 1, 2] and counts.min() > rows / 5 * 0.6  # all five, about evenly
    # rows 100..109 drawn alone (as on a replica that holds them) move as in the whole batch
    part = data.random_shift(tf.constant(dot[100:110]), data.noise_keys(7, tf.constant(3), 100, 10), 2).numpy()
    np.testing.assert_array_equal(part, moved[100:110])


def test_shift_input_only_moves_the_input_and_keeps_the_target_where_it_was():
    rows = 64
    stored = tf.constant(np.random.default_rng(1).integers(0, 256, (rows, 9, 9, 1)), tf.uint8)
    keys = data.noise_keys(7, tf.constant(3), 0, rows)
    moved_input, moved_target = data.add_noise(keys, stored, 0.0, 2)
    input_only, target = data.add_noise(keys, stored, 0.0, 2, shift_input_only=True)
    np.testing.assert_array_equal(input_only, moved_input)  # the same moves as when both are moved
    np.testing.assert_array_equal(moved_target, moved_input)
    np.testing.assert_array_equal(target, data.scale_to_unit(stored))  # the target is the image as stored
    assert not np.array_equal(input_only, target)
    noisy, noisy_target = data.add_noise(keys, stored, 0.3, 2, shift_input_only=True)
    np.testing.assert_array_equal(noisy_target, target)  # noise goes on the moved input, never on the target
    assert 0.0 <= float(tf.reduce_min(noisy)) and float(tf.reduce_max(noisy)) <= 1.0
    np.testing.assert_array_equal(noisy, data.add_noise(keys, stored, 0.3, 2)[0])


def test_augment_shift_is_refused_out_of_range_and_on_vectors(tmp_path):
    with pytest.raises(ConfigError, match="--augment-shift must be 0 to 8 pixels, got 9"):
        TrainConfig(augment_shift=9)
    np.save(tmp_path / "rows.npy", np.random.default_rng(0).random((64, 6)).astype(np.float32))
    cfg = TrainConfig(dataset=str(tmp_path / "rows.npy"), model="dense", augment_shift=1, epochs=1, batch_size=16,
                      workdir=str(tmp_path / "run"), export=False)
    with pytest.raises(ConfigError, match=r"--augment-shift moves images; this data has shape \(6,\)"):
        train.train_and_evaluate(cfg)
