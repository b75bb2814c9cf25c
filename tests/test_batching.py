import asyncio
import threading
import time

import numpy as np
import pytest

from flaxdigits.batching import Batcher, Busy
from flaxdigits.predict import Predictor


def fake_model(delay_s: float = 0.0, calls: list | None = None):
  """A Predictor whose 'model' maps an image to probabilities that depend on every pixel."""
  weights = np.random.default_rng(0).normal(size=(28 * 28, 10)).astype(np.float32)

  def probabilities(images):
    if calls is not None:
      calls.append(len(images))
    time.sleep(delay_s)
    logits = np.asarray(images).reshape(len(images), -1) @ weights
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)
  return Predictor(probabilities)


def images(n: int) -> list[np.ndarray]:
  rng = np.random.default_rng(1)
  return [rng.random((28, 28), dtype=np.float32) for _ in range(n)]


def run(coroutine):
  return asyncio.run(coroutine)


def test_concurrent_requests_share_model_calls_and_each_gets_its_own_answer():
  sizes = []
  predictor = fake_model(delay_s=0.05)
  batcher = Batcher(predictor, threads=2, on_batch=sizes.append, preprocess=lambda x: x)
  inputs = images(32)

  async def main():
    results = await asyncio.gather(*(batcher.predict(x, f"#{i}") for i, x in enumerate(inputs)))
    await batcher.aclose()
    return results
  results = run(main())
  expected = predictor.probabilities(np.stack(inputs))
  for i, (result, want) in enumerate(zip(results, expected)):
    assert result.source == f"#{i}" and result.digit == int(np.argmax(want))
    np.testing.assert_allclose(result.probabilities, want, atol=1e-6)  # batches of any size
  assert sum(sizes) == 32 and len(sizes) < 32 and max(sizes) > 1, sizes
  assert batcher.pending == 0


def test_requests_beyond_max_pending_are_refused_at_once():
  slow = lambda x: time.sleep(0.3) or x
  batcher = Batcher(fake_model(), threads=2, max_pending=2, preprocess=slow)

  async def main():
    started = time.monotonic()
    results = await asyncio.gather(*(batcher.predict(x) for x in images(5)),
                                   return_exceptions=True)
    await batcher.aclose()
    return results, time.monotonic() - started
  results, _ = run(main())
  assert [isinstance(r, Busy) for r in results] == [False, False, True, True, True]
  assert all(r.digit is not None for r in results[:2])


def test_cancelled_requests_give_up_work_not_yet_started():
  started, finished = [], threading.Event()

  def slow(x):
    started.append(x)
    time.sleep(0.3)
    finished.set()
    return x
  batcher = Batcher(fake_model(), threads=1, max_pending=8, preprocess=slow)

  async def main():
    tasks = [asyncio.create_task(batcher.predict(x)) for x in images(3)]
    await asyncio.sleep(0.1)
    for t in tasks:
      t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    pending_while_running = batcher.pending  # the running one keeps its slot ...
    while not finished.is_set():
      await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    return pending_while_running, batcher.pending  # ... until it is done
  assert run(main()) == (1, 0)
  assert len(started) == 1  # the two queued behind it never started


def test_cancelled_while_waiting_for_the_model_is_left_out_of_the_batch():
  sizes = []
  batcher = Batcher(fake_model(delay_s=0.3), threads=2, on_batch=sizes.append,
                    preprocess=lambda x: x, max_wait_s=0)

  async def main():
    first = asyncio.create_task(batcher.predict(images(1)[0]))
    await asyncio.sleep(0.1)  # the first is in the model now
    second = asyncio.create_task(batcher.predict(images(1)[0]))
    await asyncio.sleep(0.05)  # the second is queued behind it
    assert batcher.queued == 1
    second.cancel()
    result = await first
    await asyncio.sleep(0.1)
    await batcher.aclose()
    return result
  assert run(main()).digit is not None
  assert sizes == [1]  # the cancelled one never reached the model


def test_preprocessing_errors_are_answers_and_model_errors_reach_every_request():
  def preprocess(x):
    if x is None:
      raise ValueError("not an image Pillow can read")
    return x

  batcher = Batcher(fake_model(), preprocess=preprocess)

  async def main():
    return await asyncio.gather(batcher.predict(None, "bad"), batcher.predict(images(1)[0]))
  bad, good = run(main())
  assert bad.digit is None and bad.error == "not an image Pillow can read"
  assert good.error is None and good.digit is not None

  def broken(images_):
    raise RuntimeError("device lost")
  failing = Batcher(Predictor(broken), preprocess=lambda x: x)

  async def fail():
    return await asyncio.gather(*(failing.predict(x) for x in images(3)), return_exceptions=True)
  assert all(isinstance(r, RuntimeError) for r in run(fail()))
  assert failing.pending == 0


@pytest.mark.parametrize("settings", [{"max_pending": 0}, {"max_batch": 0}, {"max_wait_s": -1},
                                      {"threads": 0}])
def test_settings_are_checked(settings):
  with pytest.raises(ValueError, match="must be positive"):
    Batcher(fake_model(), **settings)


# ----------------------------------------------------------------------------- processes
# The preprocessing functions below run in the processes, so they live at module level (pickled by
# name); they report to the test through a file.

def slow_image(source):
  """(log path, seconds, value) -> a 28x28 image of `value`, after noting the start and sleeping."""
  log, seconds, value = source
  with open(log, "a", encoding="utf-8") as f:
    f.write(f"{value}\n")
  time.sleep(seconds)
  return np.full((28, 28), value, np.float32)


def refuse_or_fail(source):
  if source == "refuse":
    raise ValueError("not an image Pillow can read")
  raise ZeroDivisionError("a bug")


def test_processes_answer_each_request_and_give_up_queued_work(tmp_path):
  log = str(tmp_path / "started")
  batcher = Batcher(fake_model(), processes=1, max_pending=8, preprocess=slow_image)
  batcher.warm_up()  # the process is up before the first request

  async def main():
    answers = await asyncio.gather(*(batcher.predict((log, 0.0, v)) for v in (0.2, 0.4, 0.6)))
    running = asyncio.create_task(batcher.predict((log, 2.0, 0.8)))
    queued = [asyncio.create_task(batcher.predict((log, 0.0, v))) for v in (0.9, 0.95, 0.99)]
    await asyncio.sleep(0.3)  # one runs in the only process, the next waits in its pipe,
    for task in [running, *queued]:  # two wait here
      task.cancel()
    await asyncio.gather(running, *queued, return_exceptions=True)
    pending_while_running = batcher.pending
    deadline = time.monotonic() + 20
    while batcher.pending and time.monotonic() < deadline:
      await asyncio.sleep(0.05)  # the running one and the one in the pipe finish ...
    pending_after = batcher.pending
    await batcher.aclose()
    return answers, pending_while_running, pending_after
  answers, pending_while_running, pending_after = run(main())
  direct = fake_model().probabilities(np.stack([np.full((28, 28), v, np.float32)
                                                for v in (0.2, 0.4, 0.6)]))
  # Each answer is its own image's (batches of other sizes round float32 sums differently).
  np.testing.assert_allclose([a.probabilities for a in answers], direct, rtol=1e-4, atol=1e-7)
  assert len({tuple(a.probabilities) for a in answers}) == 3
  assert (pending_while_running, pending_after) == (2, 0)  # ... and only then free their slots
  assert open(log).read().split() == ["0.2", "0.4", "0.6", "0.8", "0.9"]  # the other two: never


def test_processes_turn_errors_into_answers_and_failures_into_exceptions():
  batcher = Batcher(fake_model(), processes=1, preprocess=refuse_or_fail)

  async def main():
    refused = await batcher.predict("refuse", "bad.png")
    with pytest.raises(RuntimeError, match=r"preprocessing failed \(ZeroDivisionError\)"):
      await batcher.predict("fail")
    pending = batcher.pending
    await batcher.aclose()
    return refused, pending
  refused, pending = run(main())
  assert refused.digit is None and refused.error == "not an image Pillow can read"
  assert pending == 0


def test_a_shut_batcher_refuses_work_and_leaves_no_process():
  batcher = Batcher(fake_model(), processes=2)
  batcher.warm_up()
  processes = [p.process for p in batcher._processes._processes]

  async def main():
    answer = await batcher.predict(np.zeros((28, 28), np.uint8) + 255)  # blank: no digit
    await batcher.aclose()
    await batcher.aclose()  # twice is harmless
    with pytest.raises(RuntimeError, match="shut down"):
      await batcher.predict(np.zeros((28, 28), np.uint8))
    return answer
  assert run(main()).error.startswith("no digit found")
  assert all(p.exitcode is not None for p in processes)
