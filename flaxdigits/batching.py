"""Classifying concurrent requests together: one model call for all that arrive together.

A server gets requests one at a time, but the model is cheapest per image in a batch. `Batcher`
preprocesses each request on a bounded pool of processes (or threads), queues its 28x28 image,
and one collector runs the model on whatever is queued (waiting up to `max_wait_s` for more, up to `max_batch`),
so under load every model call serves many requests. It admits at most `max_pending` requests at
a time; beyond that `predict` raises `Busy` at once, so overload is shed rather than queued.

A request that is cancelled (a timeout, a closed connection) gives its work up: preprocessing
that no process or thread has yet is cancelled, an image waiting for the model is dropped from the batch, and
preprocessing already running finishes (it is bounded: see `preprocess.MAX_DECODED_PIXELS`) while
still holding its slot, so abandoned work can never pile up beyond `max_pending`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import multiprocessing
import os
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np

from flaxdigits import _worker
from flaxdigits.predict import Prediction, Predictor, prediction
from flaxdigits.preprocess import ImageSource, to_mnist

MAX_PENDING = 64
MAX_BATCH = 64
MAX_WAIT_S = 0.002


class Busy(Exception):
  """More requests are pending than the batcher admits; retry in a moment."""


@dataclasses.dataclass
class _Waiting:
  image: np.ndarray
  answer: asyncio.Future


# A request this small may wait in a busy process's pipe (whose buffer takes it at once).
_PREFETCH_BYTES = 64 * 1024


class _Job:
  """One request to the preprocessing processes: queued, then held by a process, then done."""

  def __init__(self, payload: bytes, answer: asyncio.Future):
    self.payload, self.answer = payload, answer  # answer: (kind, value) from _worker.serve
    self.when_done: list[Callable[[], None]] = []  # run once no process holds it any more


class _Process:

  def __init__(self, process, connection):
    self.process, self.connection = process, connection
    self.ready = False  # warmed up
    self.jobs: collections.deque[_Job] = collections.deque()  # sent to it, answered in order


class _Processes:
  """Preprocessing processes, each fed through a pipe of its own from the event loop.

  Cheaper for the server than concurrent.futures.ProcessPoolExecutor, whose feeder thread
  pickles each call into a queue and whose manager thread reads each result back, each waking the
  next: here the event loop writes to a pipe and reads the answer in a reader callback (the
  server's CPU per request: docs/benchmarks.md). A process holds at most two requests: the one it
  runs and, if small, the next, so that it never waits for the server between two; a large upload
  goes only to an idle process, so a write never waits for a busy one. The rest wait here, in
  order, and a request cancelled before a process got it never runs. A process that dies fails
  only the requests it held, and is replaced. The processes end when the server's ends of their
  pipes close: when the pool is shut, or when the server dies, however it dies.
  """

  def __init__(self, count: int):
    # Not fork: the server runs JAX's threads. The processes import the preprocessing (NumPy,
    # SciPy, Pillow) and, as multiprocessing does, the program's main module; not JAX.
    methods = multiprocessing.get_all_start_methods()
    self._context = multiprocessing.get_context("forkserver" if "forkserver" in methods
                                                else "spawn")
    self._count = count
    self._processes: list[_Process] = []
    self._queue: collections.deque[_Job] = collections.deque()
    self._loop: asyncio.AbstractEventLoop | None = None
    self._closed = False

  def start(self, timeout_s: float = 120.0) -> None:
    """Starts the processes and waits until each has warmed up (before the event loop runs)."""
    for _ in range(self._count - len(self._processes)):
      self._spawn()
    for process in self._processes:
      if not process.ready:
        try:
          if not process.connection.poll(timeout_s):
            raise EOFError
          pickle.loads(process.connection.recv_bytes())  # ("ready", None)
        except (EOFError, OSError):
          raise RuntimeError("a preprocessing process did not start") from None
        process.ready = True

  def _spawn(self) -> None:
    ours, theirs = self._context.Pipe()
    process = self._context.Process(target=_worker.serve, args=(theirs,), daemon=True,
                                    name="flaxdigits-preprocess")
    process.start()
    theirs.close()
    self._processes.append(_Process(process, ours))
    if self._loop is not None:
      self._loop.add_reader(ours.fileno(), self._readable, self._processes[-1])

  def submit(self, preprocess: Callable | None, source: ImageSource) -> _Job:
    if self._closed:
      raise RuntimeError("the preprocessing processes are shut down")
    loop = asyncio.get_running_loop()
    if self._loop is not loop:
      self._bind(loop)
    for _ in range(self._count - len(self._processes)):
      self._spawn()  # not started by warm_up: each takes work once it says it is ready
    job = _Job(pickle.dumps((preprocess, source), pickle.HIGHEST_PROTOCOL), loop.create_future())
    self._queue.append(job)
    self._dispatch()
    return job

  def cancel(self, job: _Job) -> bool:
    """Takes a job no process holds yet out of the queue (True); False once one holds it."""
    try:
      self._queue.remove(job)
    except ValueError:
      return False
    return True

  def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
    """Reads the pipes on `loop` (the first call, or a new event loop: a test client's)."""
    if self._loop is not None:
      for process in self._processes:
        try:
          self._loop.remove_reader(process.connection.fileno())
        except (RuntimeError, ValueError, OSError):
          pass  # that loop is closed
    self._queue.clear()  # requests of a loop that is gone
    self._loop = loop
    for process in self._processes:
      loop.add_reader(process.connection.fileno(), self._readable, process)

  def _dispatch(self) -> None:
    while self._queue:
      job = self._queue[0]
      limit = 2 if len(job.payload) <= _PREFETCH_BYTES else 1
      process = min((p for p in self._processes if p.ready and len(p.jobs) < limit),
                    key=lambda p: len(p.jobs), default=None)
      if process is None:
        return
      self._queue.popleft()
      process.jobs.append(job)
      try:
        process.connection.send_bytes(job.payload)
      except OSError:
        self._died(process)

  def _readable(self, process: _Process) -> None:
    try:
      kind, value = pickle.loads(process.connection.recv_bytes())
    except (EOFError, OSError, pickle.UnpicklingError):
      self._died(process)
      return
    if kind == "ready":
      process.ready = True
    elif process.jobs:
      self._done(process.jobs.popleft(), kind, value)
    self._dispatch()

  @staticmethod
  def _done(job: _Job, kind: str, value: Any) -> None:
    if not job.answer.done():
      try:
        job.answer.set_result((kind, value))
      except RuntimeError:
        pass  # its event loop is closed: nobody waits for it
    for callback in job.when_done:
      callback()

  def _died(self, process: _Process) -> None:
    """A process is gone (killed, out of memory): its request fails and a new one starts."""
    if self._loop is not None:
      self._loop.remove_reader(process.connection.fileno())
    process.connection.close()
    if process.process.is_alive():
      process.process.kill()
    process.process.join(1)  # reaped, not left a zombie
    self._processes.remove(process)
    for job in process.jobs:
      self._done(job, "died", None)
    if not self._closed:
      self._spawn()

  def shut(self) -> None:
    """Cancels what waits here and closes the pipes: each process ends once it finishes what it
    holds. On the event loop's thread (its readers are removed here)."""
    self._closed = True
    for job in self._queue:
      job.answer.cancel()
    self._queue.clear()
    for process in self._processes:
      if process.connection.closed:
        continue  # shut before
      if self._loop is not None and not self._loop.is_closed():
        try:
          self._loop.remove_reader(process.connection.fileno())
        except (RuntimeError, ValueError):
          pass  # another event loop's, gone
      process.connection.close()

  def join(self) -> None:
    """Waits for the shut processes to end, killing any still running after 10 s (blocks: call
    it off the event loop)."""
    for process in self._processes:
      process.process.join(10)
      if process.process.is_alive():
        process.process.kill()
        process.process.join(5)


class Batcher:
  """Batches `predict` calls from many coroutines (of one event loop) into few model calls.

  Args:
    predictor: the model; its `probabilities` runs on the batches.
    processes: preprocessing processes. Preprocessing is mostly many small NumPy and Pillow
      calls that hold Python's global lock, so threads share one core between them and the
      server; processes use every core. 0 (the default) preprocesses on threads instead. The
      processes start through multiprocessing's forkserver (spawn where there is none), which
      imports the program's main module in each: guard its work with
      `if __name__ == "__main__":`. A custom `preprocess` must then be picklable (a module-level
      function).
    threads: preprocessing threads when processes is 0 (default: one per core).
    max_pending: requests admitted at once, from arrival to answer; more raise Busy.
    max_batch: the most images in one model call.
    max_wait_s: how long the collector waits for more requests once one is queued (0: take
      just what is queued: requests that arrive while the model runs form the next batch).
    on_batch: called with the size of every batch the model runs (for metrics).
    preprocess: image -> 28x28 float array (default `to_mnist`).
  """

  def __init__(self, predictor: Predictor, *, processes: int = 0, threads: int | None = None,
               max_pending: int = MAX_PENDING, max_batch: int = MAX_BATCH,
               max_wait_s: float = MAX_WAIT_S, on_batch: Callable[[int], None] | None = None,
               preprocess: Callable[[ImageSource], np.ndarray] | None = None):
    if (max_pending < 1 or max_batch < 1 or max_wait_s < 0 or processes < 0
        or (threads is not None and threads < 1)):
      raise ValueError(f"threads, max_pending and max_batch must be positive and processes and "
                       f"max_wait_s at least 0, got {threads}, {max_pending}, {max_batch}, "
                       f"{processes} and {max_wait_s}")
    self.predictor = predictor
    self.max_pending, self.max_batch, self.max_wait_s = max_pending, max_batch, max_wait_s
    self._on_batch = on_batch
    self._preprocess = preprocess
    self._processes = _Processes(processes) if processes else None
    self._threads = None if processes else concurrent.futures.ThreadPoolExecutor(
        threads or os.cpu_count() or 1, thread_name_prefix="flaxdigits-preprocess")
    self._model = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flaxdigits-model")
    self._pending = 0
    self._loop: asyncio.AbstractEventLoop | None = None
    self._queue: asyncio.Queue[_Waiting] | None = None
    self._collector: asyncio.Task | None = None

  @property
  def pending(self) -> int:
    """Requests admitted and not yet answered (or, if abandoned, not yet done preprocessing)."""
    return self._pending

  @property
  def queued(self) -> int:
    """Preprocessed images waiting for the model."""
    return self._queue.qsize() if self._queue is not None else 0

  def warm_up(self) -> None:
    """Compiles every batch shape the collector can use, and starts the preprocessing processes,
    before the first request."""
    self.predictor.warm_up(up_to=self.max_batch)
    if self._processes is not None:
      self._processes.start()

  async def predict(self, source: ImageSource, name: str = "<upload>") -> Prediction:
    """Preprocesses `source` and classifies it in the next batch; Busy if too many are pending."""
    if self._pending >= self.max_pending:
      raise Busy
    self._pending += 1
    held: list[bool] = []  # non-empty once abandoned work keeps the slot until it is done
    try:
      preprocess = self._in_process if self._processes is not None else self._in_thread
      image, error = await preprocess(source, held)
      if error is not None:
        return Prediction(name, None, None, None, None, error)
      answer = await self._classify(image)
      return prediction(name, image, answer, self.predictor.threshold)
    finally:
      if not held:
        self._release()

  async def _in_process(self, source: ImageSource,
                        held: list[bool]) -> tuple[np.ndarray | None, str | None]:
    """(the 28x28 image, None) or (None, why it is refused), from a preprocessing process."""
    job = self._processes.submit(self._preprocess, source)
    try:
      kind, value = await asyncio.shield(job.answer)
    except asyncio.CancelledError:
      # A process holds it: it keeps its slot until done. (Not if the pool was shut.)
      if not job.answer.done() and not self._processes.cancel(job):
        held.append(True)
        job.when_done.append(self._release)
      raise
    if kind == "died":
      raise RuntimeError("a preprocessing process died")
    if kind == "failed":
      raise RuntimeError(f"preprocessing failed ({value})")
    return (None, value) if kind == "error" else (value, None)

  async def _in_thread(self, source: ImageSource,
                       held: list[bool]) -> tuple[np.ndarray | None, str | None]:
    """(the 28x28 image, None) or (None, why it is refused), from a preprocessing thread."""
    work = self._threads.submit(self._preprocess or to_mnist, source)
    try:
      return await asyncio.wrap_future(work), None
    except asyncio.CancelledError:
      if not work.cancel():  # running: it keeps its slot until it is done
        held.append(True)
        loop = asyncio.get_running_loop()
        work.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
      raise
    except (ValueError, FileNotFoundError) as e:
      return None, str(e)

  def _release(self) -> None:
    self._pending -= 1

  async def _classify(self, image: np.ndarray) -> np.ndarray:
    loop = asyncio.get_running_loop()
    if self._loop is not loop:  # the first call, or a new event loop (a test client's, say)
      self._loop, self._queue = loop, asyncio.Queue()
      self._collector = None
    if self._collector is None or self._collector.done():
      self._collector = loop.create_task(self._collect(self._queue), name="flaxdigits-batcher")
    waiting = _Waiting(image, loop.create_future())
    self._queue.put_nowait(waiting)
    return await waiting.answer  # cancelled: the collector skips it

  async def _collect(self, queue: asyncio.Queue[_Waiting]) -> None:
    loop = asyncio.get_running_loop()
    while True:
      batch = [await queue.get()]
      deadline = loop.time() + self.max_wait_s
      while len(batch) < self.max_batch:
        if not queue.empty():
          batch.append(queue.get_nowait())
          continue
        left = deadline - loop.time()
        if left <= 0:
          break
        try:
          batch.append(await asyncio.wait_for(queue.get(), left))
        except TimeoutError:
          break
      batch = [w for w in batch if not w.answer.done()]  # cancelled while queued
      if not batch:
        continue
      images = np.stack([w.image for w in batch])
      try:
        probabilities = await loop.run_in_executor(self._model, self.predictor.probabilities,
                                                   images)
      except Exception as e:  # pylint: disable=broad-except
        for w in batch:
          if not w.answer.done():
            w.answer.set_exception(e)
        continue
      if self._on_batch is not None:
        self._on_batch(len(batch))
      for w, p in zip(batch, probabilities):
        if not w.answer.done():
          w.answer.set_result(p)

  async def aclose(self) -> None:
    """Stops the collector and the threads; queued preprocessing is cancelled."""
    if self._collector is not None and self._loop is asyncio.get_running_loop():
      self._collector.cancel()
      try:
        await self._collector
      except asyncio.CancelledError:
        pass
    # Waits for the processes to exit (running work is bounded), so that none outlives this one.
    if self._processes is not None:
      self._processes.shut()
      await asyncio.to_thread(self._processes.join)
    else:
      await asyncio.to_thread(self._threads.shutdown, wait=True, cancel_futures=True)
    self._model.shutdown(wait=False, cancel_futures=True)

