"""Load test of `digits serve` on loopback: concurrent clients posting real MNIST test digits.

  python scripts/load_test.py --checkpoint ckpt --data-dir ../shared/data/mnist

Starts `digits serve` on a free loopback port, waits for /healthz, then --clients threads send
--requests POST /api/predict in all (each a different test digit as a 112 px dark-on-light PNG),
each with a 30 s time-out, the whole run bounded by --max-seconds. Prints latency percentiles,
requests/s, errors and accuracy; exits 1 on any error. Warm-up requests are not counted.
"""

from __future__ import annotations

import argparse
import io
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
from PIL import Image


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def png(digit_28x28: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(255 - digit_28x28).resize((112, 112), Image.BICUBIC).save(buffer, "PNG")
  return buffer.getvalue()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default="ckpt")
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--clients", type=int, default=20)
  parser.add_argument("--requests", type=int, default=1000)
  parser.add_argument("--max-seconds", type=float, default=300)
  args = parser.parse_args()
  from flaxdigits.data import load_mnist
  test = load_mnist(args.data_dir, ("test",))["test"]
  bodies = [png(test.images[i]) for i in range(args.requests)]
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen([shutil.which("digits"), "serve", "-c", args.checkpoint, "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 120
    while True:
      try:
        if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
          break
      except httpx.TransportError:
        pass
      if server.poll() is not None or time.monotonic() > deadline:
        sys.exit(f"server did not start: {server.stderr.read().decode()[-500:]}")
      time.sleep(0.2)
    with httpx.Client(base_url=url) as warm:
      for body in bodies[:5]:
        warm.post("/api/predict", files={"file": body})

    next_index = iter(range(args.requests))
    lock = threading.Lock()
    latencies, errors, correct = [], [], 0
    stop_at = time.monotonic() + args.max_seconds

    def client() -> None:
      nonlocal correct
      with httpx.Client(base_url=url, timeout=30) as http:
        while time.monotonic() < stop_at:
          with lock:
            i = next(next_index, None)
          if i is None:
            return
          start = time.perf_counter()
          try:
            response = http.post("/api/predict", files={"file": ("d.png", bodies[i], "image/png")})
            ok = response.status_code == 200
            digit = response.json().get("digit") if ok else None
          except httpx.HTTPError as e:
            ok, digit, response = False, None, e
          elapsed = time.perf_counter() - start
          with lock:
            latencies.append(elapsed)
            if not ok:
              errors.append(str(getattr(response, "status_code", response)))
            correct += digit == int(test.labels[i])

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    began = time.perf_counter()
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    wall = time.perf_counter() - began
  finally:
    server.terminate()
    server.wait(10)
  done = len(latencies)
  ms = np.percentile(np.array(latencies) * 1000, [50, 90, 99])
  print(f"{done} requests from {args.clients} concurrent clients in {wall:.1f} s: "
        f"{done / wall:.1f} requests/s")
  print(f"latency p50 {ms[0]:.0f} ms, p90 {ms[1]:.0f} ms, p99 {ms[2]:.0f} ms, "
        f"max {1000 * max(latencies):.0f} ms, mean {1000 * statistics.mean(latencies):.0f} ms")
  print(f"errors: {len(errors)}{' ' + str(sorted(set(errors))) if errors else ''}; "
        f"correct digits: {correct}/{done}")
  if errors or done < args.requests:
    sys.exit(1)


if __name__ == "__main__":
  main()
