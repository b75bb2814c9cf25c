"""Classifying concurrent requests together: one model call for all that arrive together.

A server gets requests one at a time, but the model is cheapest per image in a batch. `Batcher`
preprocesses each request on a bounded thread pool, queues its 28x28 image, and one collector
runs the model on whatever is queued (waiting up to `max_wait_s` for more, up to `max_batch`),
so under load every model call serves many requests. It admits at most `max_pending` requests at
a time; beyond that `predict` raises `Busy` at once, so overload is shed rather than queued.

A request that is cancelled (a timeout, a closed connection) gives its work up: preprocessing
that has not started is cancelled, an image waiting for the model is dropped from the batch, and
preprocessing already running finishes (it is bounded: see `preprocess.MAX_DECODED_PIXELS`) while
still holding its slot, so abandoned work can never pile up beyond `max_pending`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.process
import dataclasses
import multiprocessing
import os
from collections.abc import Callable

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


class Batcher:
  """Batches `predict` calls from many coroutines (of one event loop) into few model calls.

  Args:
    predictor: the model; its `probabilities` runs on the batches.
    processes: preprocessing processes. Preprocessing is mostly many small NumPy and Pillow
      calls that hold Python's global lock, so threads share one core between them and the
      server; processes use every core. 0 (the default) preprocesses on threads instead. The
      processes start through multiprocessing's forkserver (spawn where there is none), which
      imports the program's main module in each: guard its work with
      `if __name__ == "__main__":`.
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
    self._processes = processes
    self._pool = (self._process_pool() if processes else concurrent.futures.ThreadPoolExecutor(
        threads or os.cpu_count() or 1, thread_name_prefix="flaxdigits-preprocess"))
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

  def _process_pool(self) -> concurrent.futures.ProcessPoolExecutor:
    # Not fork: this process runs JAX's threads. The workers import the preprocessing (NumPy,
    # SciPy, Pillow) and, as multiprocessing does, the program's main module; not JAX.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    return concurrent.futures.ProcessPoolExecutor(self._processes, mp_context=context,
                                                  initializer=_worker.exit_with_parent)

  def warm_up(self) -> None:
    """Compiles every batch shape the collector can use, and starts the preprocessing processes,
    before the first request."""
    self.predictor.warm_up(up_to=self.max_batch)
    if self._processes:
      concurrent.futures.wait([self._pool.submit(_worker.warm_up)
                               for _ in range(self._processes)])

  async def predict(self, source: ImageSource, name: str = "<upload>") -> Prediction:
    """Preprocesses `source` and classifies it in the next batch; Busy if too many are pending."""
    if self._pending >= self.max_pending:
      raise Busy
    self._pending += 1
    release = True
    try:
      pool = self._pool
      work = pool.submit(self._preprocess or to_mnist, source)
      try:
        image = await asyncio.wrap_future(work)
      except asyncio.CancelledError:
        if not work.cancel():  # running: it keeps its slot until it is done
          release = False
          loop = asyncio.get_running_loop()
          work.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        raise
      except (ValueError, FileNotFoundError) as e:
        return Prediction(name, None, None, None, None, str(e))
      except concurrent.futures.process.BrokenProcessPool:
        # A worker died (killed, out of memory): its requests fail; later ones get a new pool.
        if isinstance(self._pool, concurrent.futures.ProcessPoolExecutor) and self._pool is pool:
          self._pool = self._process_pool()
        raise RuntimeError("a preprocessing process died") from None
      answer = await self._classify(image)
      return prediction(name, image, answer, self.predictor.threshold)
    finally:
      if release:
        self._release()

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
    await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
    self._model.shutdown(wait=False, cancel_futures=True)

