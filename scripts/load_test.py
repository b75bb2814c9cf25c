"""Load test of `digits serve` on loopback: concurrent keep-alive clients posting MNIST test digits.

  python scripts/load_test.py --checkpoint ckpt --data-dir ../shared/data/mnist
  python scripts/load_test.py ... --against ../old-checkout --rounds 2   # side by side
  python scripts/load_test.py ... --requests 10000 --clients 20          # memory over time

Starts `digits serve` on a free loopback port, waits for /healthz, then --clients threads, each
with one keep-alive connection, send --requests POST /api/predict in all (each a different test
digit), each with a 30 s time-out, the whole run bounded by --max-seconds; a client answered 503
waits the second its Retry-After asks before its next request. Kinds of request:
  pad    what the page sends while you draw: its 280x280 canvas (black on white) as a PNG of
         --pad-side px (the page sends 112; it sent 280, then 160, before), in a
         JSON data URL
  photo  a 112 px dark-on-light PNG as a multipart upload
Prints requests/s, latency percentiles, the count of each status, accuracy, and the server's
resident memory (with its preprocessing processes) after the first 100 requests and at the end,
and the CPU time per request of the server's own process, of its preprocessing processes and of
the clients (all on the same cores). Warm-up requests are not counted.
With --against DIR (a checkout of another commit, sharing this environment), each round runs
both servers one after the other, this one first. Exits 1 on any failure but 503s, or on 503s
without --allow-busy.
"""

from __future__ import annotations

import argparse
import base64
import collections
import functools
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import _checkout
import numpy as np
from bench_preprocess import pad_png
from PIL import Image

HERE = Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def pad_request(digit_28x28: np.ndarray, side: int = 112) -> tuple[bytes, str]:
  """The page's request while drawing: its canvas as a PNG of `side` px in a JSON data URL."""
  url = "data:image/png;base64," + base64.b64encode(pad_png(digit_28x28, side)).decode()
  return json.dumps({"image": url}).encode(), "application/json"


def photo_request(digit_28x28: np.ndarray) -> tuple[bytes, str]:
  """A 112 px dark-on-light PNG as a multipart upload."""
  buffer = io.BytesIO()
  Image.fromarray(255 - digit_28x28).resize((112, 112), Image.BICUBIC).save(buffer, "PNG")
  boundary = "flaxdigitsboundary"
  body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.png\"\r\n"
          f"Content-Type: image/png\r\n\r\n").encode() + buffer.getvalue() + \
      f"\r\n--{boundary}--\r\n".encode()
  return body, f"multipart/form-data; boundary={boundary}"


def process_tree(pid: int) -> list[int]:
  """A process and every process below it (the server's preprocessing workers)."""
  parents = {}
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
      continue
  tree, frontier = [pid], [pid]
  while frontier:
    frontier = [child for child, parent in parents.items() if parent in frontier]
    tree += frontier
  return tree


def rss_mb(pid: int) -> float:
  """Resident memory of a process and every process below it (its preprocessing workers)."""
  total = 0.0
  for member in process_tree(pid):
    try:
      for line in Path(f"/proc/{member}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
          total += int(line.split()[1]) / 1024
    except OSError:
      pass
  return total


def cpu_seconds(pid: int) -> float:
  """User + system CPU time of a process so far (0 once it is gone)."""
  try:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
  except OSError:
    return 0.0
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(root: Path, checkpoint: str, port: int, log,
                 extra: list[str]) -> subprocess.Popen:
  server = subprocess.Popen([*_checkout.digits(root), "serve", "-c", checkpoint,
                             "--port", str(port), *extra], stdout=subprocess.DEVNULL, stderr=log)
  deadline = time.monotonic() + 180
  while True:
    try:
      connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
      connection.request("GET", "/healthz")
      if connection.getresponse().status == 200:
        return server
    except OSError:
      pass
    if server.poll() is not None or time.monotonic() > deadline:
      server.kill()
      log.seek(0)
      sys.exit(f"server did not start: {log.read().decode()[-500:]}")
    time.sleep(0.2)


def run(root: Path, args, requests: list[tuple[bytes, str]], labels: np.ndarray) -> dict:
  port = free_port()
  with open(f"/tmp/flaxdigits-load-{port}.log", "w+b") as log:
    extra = args.server_args.split() if root == HERE else []
    checkpoint = args.checkpoint if root == HERE else (args.against_checkpoint or args.checkpoint)
    server = start_server(root, checkpoint, port, log, extra)
    try:
      return load(server.pid, port, args, requests, labels)
    finally:
      server.terminate()
      server.wait(15)


def load(pid: int, port: int, args, requests, labels) -> dict:
  def post(connection, i):
    body, content_type = requests[i % len(requests)]
    connection.request("POST", "/api/predict", body, {"content-type": content_type})
    response = connection.getresponse()
    return response.status, response.read()

  warm = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
  for i in range(5):
    post(warm, i)
  warm.close()
  next_index = iter(range(args.requests))
  lock = threading.Lock()
  latencies, statuses, correct, rejected, memory = [], collections.Counter(), 0, 0, {}
  stop_at = time.monotonic() + args.max_seconds

  def client() -> None:
    nonlocal correct, rejected
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.monotonic() < stop_at:
      with lock:
        i = next(next_index, None)
      if i is None:
        break
      start = time.perf_counter()
      try:
        status, body = post(connection, i)
        answer = json.loads(body) if status == 200 else {}
        digit = answer.get("digit")
        not_a_digit = answer.get("reason") == "not a digit"
      except (OSError, http.client.HTTPException) as e:
        status, digit, not_a_digit = type(e).__name__, None, False
        connection.close()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
      elapsed = time.perf_counter() - start
      if status == 503:
        time.sleep(1.0)  # Retry-After: 1, as a well-behaved client waits
      with lock:
        latencies.append(elapsed)
        statuses[status] += 1
        correct += digit == int(labels[i % len(labels)])
        rejected += not_a_digit
        if len(latencies) == 100:
          memory["after 100"] = rss_mb(pid)
    connection.close()

  threads = [threading.Thread(target=client) for _ in range(args.clients)]
  workers = process_tree(pid)[1:]
  cpu_before, client_before = cpu_seconds(pid), time.process_time()
  workers_before = sum(map(cpu_seconds, workers))
  began = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - began
  cpu, client_cpu = cpu_seconds(pid) - cpu_before, time.process_time() - client_before
  workers_cpu = sum(map(cpu_seconds, workers)) - workers_before
  memory["at the end"] = rss_mb(pid)
  ms = np.percentile(np.array(latencies) * 1000, [50, 90, 99])
  return {"done": len(latencies), "wall": wall, "p50": ms[0], "p90": ms[1], "p99": ms[2],
          "max": 1000 * max(latencies), "statuses": dict(statuses), "correct": correct,
          "rejected": rejected,
          "memory": memory, "cpu_ms": 1000 * cpu / max(1, len(latencies)),
          "client_cpu_ms": 1000 * client_cpu / max(1, len(latencies)),
          "workers_cpu_ms": 1000 * workers_cpu / max(1, len(latencies))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default="ckpt")
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--kind", choices=("pad", "photo"), default="pad")
  parser.add_argument("--pad-side", type=int, default=112)
  parser.add_argument("--clients", type=int, default=20)
  parser.add_argument("--requests", type=int, default=2000)
  parser.add_argument("--max-seconds", type=float, default=300)
  parser.add_argument("--against", type=Path, help="a checkout of another commit to compare")
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--allow-busy", action="store_true", help="503s are not failures")
  parser.add_argument("--against-checkpoint",
                      help="the checkpoint for --against (default: --checkpoint), where the "
                      "checkout reads another checkpoint format")
  parser.add_argument("--server-args", default="",
                      help="more options for this checkout's `digits serve`, in one string")
  args = parser.parse_args()
  from flaxdigits.data import load_mnist  # pylint: disable=import-outside-toplevel
  test = load_mnist(args.data_dir, ("test",))["test"]
  make = functools.partial(pad_request, side=args.pad_side) if args.kind == "pad" else photo_request
  count = min(len(test.labels), args.requests, 2000)  # distinct bodies, reused beyond
  requests = [make(test.images[i]) for i in range(count)]
  roots = {"this": HERE} | ({"against": args.against.resolve()} if args.against else {})
  failed = False
  for round_ in range(args.rounds):
    for name, root in roots.items():
      r = run(root, args, requests, test.labels[:count])
      statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items(), key=str))
      memory = ", ".join(f"{k} {v:.0f} MB" for k, v in r["memory"].items())
      kind = f"{args.pad_side} px pad" if args.kind == "pad" else "photo"
      print(f"round {round_ + 1} {name}: {r['done']} {kind} requests from {args.clients} "
            f"clients in {r['wall']:.1f} s: {r['done'] / r['wall']:.1f} requests/s; latency p50 "
            f"{r['p50']:.0f} ms, p90 {r['p90']:.0f} ms, p99 {r['p99']:.0f} ms, max "
            f"{r['max']:.0f} ms; CPU per request: server process {r['cpu_ms']:.1f} ms, preprocessing "
            f"processes {r['workers_cpu_ms']:.1f} ms, clients "
            f"{r['client_cpu_ms']:.1f} ms; statuses {statuses}; "
            f"correct {r['correct']}/{r['done']} ({r['rejected']} not a digit); "
            f"server memory {memory}", flush=True)
      bad = {k: v for k, v in r["statuses"].items() if k != 200 and (k != 503 or
                                                                      not args.allow_busy)}
      failed |= bool(bad) or r["done"] < args.requests
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  main()
