"""Server-side batching (--enable_batching): concurrent Predict calls become one model call.

Requests for the same servable, signature, outputs and row shape join an open batch until it
holds max_batch_size rows or its first request has waited batch_timeout_micros; a batch thread
then concatenates the inputs, pads the batch up to the next allowed_batch_sizes entry, runs the
model once and hands each caller its own rows. More than max_enqueued_batches waiting batches
per queue is refused with UNAVAILABLE, as in TF Serving's BasicBatchScheduler.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import os
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np

from serving.errors import ServingError, invalid_argument, unavailable

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclasses.dataclass
class BatchingOptions:
    max_batch_size: int = 1000  # rows in one model call
    batch_timeout_micros: int = 0  # how long the first request of a batch may wait for company
    max_enqueued_batches: int = 10  # per queue; beyond it requests get UNAVAILABLE
    num_batch_threads: int = os.cpu_count() or 1  # model calls in parallel
    allowed_batch_sizes: tuple[int, ...] = ()  # pad each batch up to the next of these
    pad_variable_length_inputs: bool = False  # pad dims other than the batch with zeros

    @classmethod
    def from_proto(cls, params) -> BatchingOptions:
        """From a parsed BatchingParameters message (unset fields keep TF Serving's defaults)."""
        options = cls()
        for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
            if params.HasField(name):
                setattr(options, name, int(getattr(params, name).value))
        options.allowed_batch_sizes = tuple(params.allowed_batch_sizes)
        options.pad_variable_length_inputs = params.pad_variable_length_inputs
        options.validate()
        return options

    def validate(self) -> None:
        if self.max_batch_size <= 0 or self.num_batch_threads <= 0 or self.max_enqueued_batches <= 0:
            raise ValueError("max_batch_size, num_batch_threads and max_enqueued_batches must be positive")
        sizes = list(self.allowed_batch_sizes)
        if sizes and (sizes != sorted(set(sizes)) or sizes[-1] != self.max_batch_size):
            raise ValueError("allowed_batch_sizes must increase strictly and end with max_batch_size "
                             f"({self.max_batch_size}); got {sizes}")


@dataclasses.dataclass
class _Task:
    inputs: dict[str, np.ndarray]
    rows: int
    done: threading.Event | None = None  # threaded callers wait on this ...
    future: asyncio.Future | None = None  # ... asyncio callers on this, settled on their own loop
    outputs: dict[str, np.ndarray] | None = None
    error: Exception | None = None
    enqueued: float = dataclasses.field(default_factory=time.monotonic)  # for the queuing-latency metric

    def result(self) -> dict[str, np.ndarray]:
        if self.error is not None:
            raise self.error
        return self.outputs


@dataclasses.dataclass
class _Batch:
    runner: Runner
    created: float
    tasks: list[_Task] = dataclasses.field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tasks)


class BatchScheduler:
    def __init__(self, options: BatchingOptions, on_batch: Callable[[int, int, list[float]], None] | None = None):
        """`on_batch(rows, padded rows, seconds each request waited)` is called after each batch runs."""
        self.options = options
        self._on_batch = on_batch or (lambda rows, padded, queued: None)
        self._queues: dict[tuple, collections.deque[_Batch]] = {}
        self._cond = threading.Condition()
        self._stopped = False
        self._threads = [threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
                         for i in range(options.num_batch_threads)]
        for t in self._threads:
            t.start()

    def run(self, key: tuple, inputs: dict[str, np.ndarray], runner: Runner,
            timeout: float | None = None) -> dict[str, np.ndarray]:
        """Queues `inputs` (all with the same batch size) and blocks until its rows come back."""
        task = self._enqueue(key, _Task(inputs, _batch_rows(inputs), done=threading.Event()), runner)
        if not task.done.wait(timeout):
            raise _deadline_exceeded()
        return task.result()

    async def run_async(self, key: tuple, inputs: dict[str, np.ndarray], runner: Runner,
                        timeout: float | None = None) -> dict[str, np.ndarray]:
        """`run` for asyncio callers: waits on a future, so no thread is held per request."""
        loop = asyncio.get_running_loop()
        task = self._enqueue(key, _Task(inputs, _batch_rows(inputs), future=loop.create_future()), runner)
        # A timer, not asyncio.wait_for: that wraps every request in one more Task (Python < 3.12).
        timer = loop.call_later(timeout, _expire, task.future) if timeout is not None else None
        try:
            await task.future
        finally:
            if timer is not None:
                timer.cancel()
        return task.result()

    def _enqueue(self, key: tuple, task: _Task, runner: Runner) -> _Task:
        inputs, rows = task.inputs, task.rows
        if rows > self.options.max_batch_size:
            raise invalid_argument(f"Task size {rows} is larger than maximum input batch size "
                                   f"{self.options.max_batch_size}")
        # Only requests whose rows can be stacked share a batch (same rank always; same row shape
        # unless pad_variable_length_inputs lets the batch pad them).
        shapes = tuple((k, v.ndim if self.options.pad_variable_length_inputs else v.shape[1:], v.dtype.str)
                       for k, v in sorted(inputs.items()))
        with self._cond:
            queue = self._queues.setdefault((key, shapes), collections.deque())
            if queue and queue[-1].rows + rows <= self.options.max_batch_size:
                queue[-1].tasks.append(task)
            else:
                if len(queue) >= self.options.max_enqueued_batches:
                    raise unavailable("The batch scheduling queue to which this task was submitted is full")
                queue.append(_Batch(runner, time.monotonic(), [task]))
            self._cond.notify()
        return task

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                batch = self._take_ready()
                while batch is None:
                    if self._stopped:
                        return
                    self._cond.wait(self._wait_time())
                    batch = self._take_ready()
            self._run(batch)

    def _take_ready(self) -> _Batch | None:
        """Pops the oldest batch that is full or has waited out its timeout."""
        now, timeout = time.monotonic(), self.options.batch_timeout_micros / 1e6
        ready = [(q[0].created, q) for q in self._queues.values()
                 if q and (q[0].rows >= self.options.max_batch_size or now - q[0].created >= timeout)]
        if not ready:
            return None
        return min(ready, key=lambda item: item[0])[1].popleft()

    def _wait_time(self) -> float | None:
        pending = [q[0].created for q in self._queues.values() if q]
        if not pending:
            return None
        return max(0.0, min(pending) + self.options.batch_timeout_micros / 1e6 - time.monotonic())

    def _run(self, batch: _Batch) -> None:
        started = time.monotonic()
        try:
            merged, padded = self._merge(batch.tasks)
            outputs = batch.runner(merged)
            self._on_batch(batch.rows, padded, [started - task.enqueued for task in batch.tasks])
            start = 0
            for task in batch.tasks:
                task.outputs = {k: _rows(v, start, task.rows, padded, k) for k, v in outputs.items()}
                start += task.rows
        except Exception as e:  # noqa: BLE001 - every caller in the batch gets the error
            for task in batch.tasks:
                task.error = e
        _notify(batch.tasks)

    def _merge(self, tasks: list[_Task]) -> tuple[dict[str, np.ndarray], int]:
        rows = sum(t.rows for t in tasks)
        padded = self._padded_size(rows)
        merged = {}
        for alias in tasks[0].inputs:
            parts = [t.inputs[alias] for t in tasks]
            if self.options.pad_variable_length_inputs:
                parts = _pad_to_common_shape(parts)
            if padded > rows:  # repeat the last row: padding rows are computed and thrown away
                parts.append(np.repeat(parts[-1][-1:], padded - rows, axis=0))
            merged[alias] = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        return merged, padded

    def _padded_size(self, rows: int) -> int:
        sizes = self.options.allowed_batch_sizes
        return sizes[bisect.bisect_left(sizes, rows)] if sizes else rows


def _notify(tasks: list[_Task]) -> None:
    """Wakes every caller of a finished batch: one wake-up per event loop, not one per request."""
    by_loop = collections.defaultdict(list)
    for task in tasks:
        if task.future is None:
            task.done.set()
        else:
            by_loop[task.future.get_loop()].append(task.future)
    for loop, futures in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, futures)
        except RuntimeError:  # that loop has closed (shutdown): nobody is left waiting
            pass


def _settle(futures: list[asyncio.Future]) -> None:
    for future in futures:
        if not future.done():  # the caller may have timed out already
            future.set_result(None)


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(_deadline_exceeded())


def _deadline_exceeded() -> ServingError:
    return ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline exceeded waiting for a batch")


def _pad_to_common_shape(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Zero-pads every non-batch dimension up to the largest in the batch."""
    target = np.max([p.shape[1:] for p in parts], axis=0)
    return [np.pad(p, [(0, 0)] + [(0, int(t - d)) for t, d in zip(target, p.shape[1:])]) for p in parts]


def _batch_rows(inputs: dict[str, np.ndarray]) -> int:
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in inputs.items()}
    distinct = set(sizes.values())
    if None in distinct or len(distinct) != 1:
        raise invalid_argument(f"Batching session Run() input tensors must have equal 0th-dimension size; "
                               f"got {sizes}")
    return distinct.pop()


def _rows(output: np.ndarray, start: int, count: int, padded: int, alias: str) -> np.ndarray:
    if output.ndim == 0 or output.shape[0] != padded:
        raise invalid_argument(f"Batched output tensor '{alias}' has 0th dimension "
                               f"{output.shape[0] if output.ndim else 'scalar'}, expected {padded}")
    return output[start:start + count]
