"""Model lifecycle under faults, in-process: load retries (TF Serving's --max_num_load_retries and
--load_retry_interval_micros), versions whose files change after a failed load, a deleted serving
version, and all-or-nothing reloads."""

from __future__ import annotations

import os
import shutil
import time

import grpc
import pytest

from serving.errors import ServingError
from serving.manager import ModelManager, State
from serving.servable import Servable
from tests.model_fixtures import write_tf2
from tests.test_serving_components import Policy, config


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Versions 1, 2, 3 of half_plus_two with b = 2, 3, 4."""
    root = tmp_path_factory.mktemp("lifecycle")
    for version in (1, 2, 3):
        write_tf2(root / str(version), b=1.0 + version)
    return root


def states(manager, name="m"):
    return {s.version: s for s in manager.status(name)}


class FlakyLoader:
    """The real loader, failing the first `failures` calls (a disk or network hiccup)."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, 0

    def __call__(self, name, version, path):
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(f"transient read error #{self.calls}")
        return Servable(name, version, path)


def poll_until(manager, condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        manager.poll()
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_failed_load_is_retried_after_the_interval_and_stays_loading_meanwhile(tmp_path, versions):
    shutil.copytree(versions / "1", tmp_path / "m" / "1")
    loader = FlakyLoader(failures=2)
    manager = ModelManager(loader, max_load_retries=5, load_retry_interval=0.3)
    manager.configure(config(tmp_path / "m"))
    manager.poll()
    assert states(manager)[1].state == State.LOADING and loader.calls == 1
    manager.poll()  # not due yet: no new attempt
    assert loader.calls == 1
    with pytest.raises(ServingError) as info:
        manager.resolve("m")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE  # retryable while it retries
    assert poll_until(manager, lambda: states(manager)[1].state == State.AVAILABLE)
    assert loader.calls == 3


def test_a_load_that_keeps_failing_ends_after_max_retries_with_its_error(tmp_path, versions):
    shutil.copytree(versions / "1", tmp_path / "m" / "1")
    loader = FlakyLoader(failures=100)
    manager = ModelManager(loader, max_load_retries=2, load_retry_interval=-1)  # negative: no wait
    manager.configure(config(tmp_path / "m"))
    assert poll_until(manager, lambda: states(manager)[1].state == State.END)
    assert loader.calls == 3  # the first try and 2 retries
    assert "transient read error #3" in states(manager)[1].error.message
    manager.poll()
    assert loader.calls == 3


def test_the_poller_retries_on_its_own_even_without_file_system_polling(tmp_path, versions):
    shutil.copytree(versions / "1", tmp_path / "m" / "1")
    loader = FlakyLoader(failures=1)
    manager = ModelManager(loader, max_load_retries=1, load_retry_interval=0.2)
    manager.configure(config(tmp_path / "m"))
    manager.start_polling(0)  # --file_system_poll_wait_seconds=0: scanned once, retries still happen
    try:
        assert manager.initial_load_done.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and states(manager)[1].state != State.AVAILABLE:
            time.sleep(0.05)
        assert states(manager)[1].state == State.AVAILABLE and loader.calls == 2
    finally:
        manager.stop()


def test_a_version_copied_in_place_loads_once_its_files_are_complete(tmp_path, versions):
    base = tmp_path / "m"
    shutil.copytree(versions / "1", base / "1")
    manager = ModelManager(max_load_retries=0)  # no retries: only the change of files brings it back
    manager.reload(config(base))
    half = base / "2"
    shutil.copytree(versions / "2" / "variables", half / "variables")  # saved_model.pb not copied yet
    manager.poll()
    assert states(manager)[2].state == State.END and "saved_model.pb" in states(manager)[2].error.message
    assert manager.resolve("m").version == 1
    manager.poll()
    assert states(manager)[2].state == State.END  # nothing changed: not tried again
    shutil.copy(versions / "2" / "saved_model.pb", half / "saved_model.pb")
    manager.poll()
    assert states(manager)[2].state == State.AVAILABLE and manager.resolve("m").version == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_version_unreadable_when_first_scanned_loads_once_readable(tmp_path, versions):
    base = tmp_path / "m"
    shutil.copytree(versions / "1", base / "1")
    (base / "1" / "saved_model.pb").chmod(0)
    manager = ModelManager(max_load_retries=0)
    manager.reload(config(base))
    assert states(manager)[1].state == State.END
    (base / "1" / "saved_model.pb").chmod(0o644)
    manager.poll()
    assert states(manager)[1].state == State.AVAILABLE


def test_deleting_the_serving_version_serves_the_now_latest_older_one(tmp_path, versions):
    base = tmp_path / "m"
    for v in (1, 2):
        shutil.copytree(versions / str(v), base / str(v))
    manager = ModelManager()
    manager.reload(config(base))  # latest {1}: only version 2 loads
    assert {v: s.state for v, s in states(manager).items()} == {2: State.AVAILABLE}
    shutil.rmtree(base / "2")
    manager.poll()
    assert manager.resolve("m").version == 1  # as TF Serving: the policy now aspires version 1
    assert states(manager)[2].state == State.END


def test_deleting_the_serving_version_brings_back_an_older_one_that_failed_while_being_copied(tmp_path, versions):
    base = tmp_path / "m"
    shutil.copytree(versions / "1" / "variables", base / "1" / "variables")  # saved_model.pb not there yet
    manager = ModelManager(max_load_retries=0)
    manager.reload(config(base))
    assert states(manager)[1].state == State.END
    shutil.copytree(versions / "2", base / "2")
    manager.poll()
    shutil.copy(versions / "1" / "saved_model.pb", base / "1" / "saved_model.pb")  # the copy completes
    manager.poll()
    assert manager.resolve("m").version == 2 and states(manager)[1].state == State.END  # not aspired
    shutil.rmtree(base / "2")
    manager.poll()
    assert manager.resolve("m").version == 1


def test_retries_stop_when_the_version_is_no_longer_aspired(tmp_path, versions):
    base = tmp_path / "m"
    shutil.copytree(versions / "1", base / "1")
    loader = FlakyLoader(failures=1)
    manager = ModelManager(loader, max_load_retries=5, load_retry_interval=3600)
    manager.configure(config(base))
    manager.poll()
    assert states(manager)[1].state == State.LOADING
    shutil.copytree(versions / "2", base / "2")
    manager.poll()
    assert manager.resolve("m").version == 2
    assert states(manager)[1].state == State.END and "cancelled" in states(manager)[1].error.message
    assert manager.next_retry_in() is None


def test_a_failed_reload_leaves_the_previous_model_set_untouched(tmp_path, versions):
    base = tmp_path / "m"
    for v in (1, 2):
        shutil.copytree(versions / str(v), base / str(v))
    manager = ModelManager()
    manager.reload(config(base, Policy(all=Policy.All()), {"stable": 1}))
    bad = config(base, labels={"stable": 1}, name="m")  # latest {1}: version 1 would not be available
    bad.model_config_list.config.add(name="new", base_path=str(base))
    with pytest.raises(ServingError) as info:
        manager.reload(bad)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert manager.resolve("m", label="stable").version == 1  # the label and both versions still serve
    assert manager.resolve("m", version=2).version == 2
    with pytest.raises(ServingError, match=r"Latest\(new\)"):
        manager.resolve("new")
    duplicate = config(base)
    duplicate.model_config_list.config.add(name="m", base_path=str(base))
    with pytest.raises(ServingError, match="multiple times"):
        manager.reload(duplicate)
    assert manager.resolve("m", label="stable").version == 1
