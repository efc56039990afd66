"""`python -m vlmtune.bench.serve_load`: requests/s and latency of ``vlmtune serve`` at 1, 4 and 16 concurrent
clients, with dynamic batching and without.

The server is the real command (``python -m vlmtune serve``) in a child process, serving the builtin base
(``ensure_base``); once with ``--max-batch 16`` and once with ``--no-batching``. Each client is a thread sending
chat completions back to back over plain HTTP (one 64x64 shapes image as a data: URI, "Describe the image.", greedy,
``max_tokens`` 16) until it has sent ``--requests`` requests; two warm-up requests go first. Latency is each request's
wall time at the client; requests/s is all requests over the wall time of the round. Both servers run throughout
and the rounds alternate (batched, then unbatched, at each concurrency), so a change in the machine's load falls on
both. The table also shows the mean batch size the server reports (``/health``), how many batched answers equal the
unbatched answer to the same request (greedy: batching must not change them), and the ratio batched / unbatched at
the same concurrency.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from vlmtune.builtin.base import ensure_base
from vlmtune.data.shapes import QUESTIONS, random_scene, render_scene

MODEL = "builtin"


def _prompts(n: int, seed: int = 0) -> list[dict]:
    """Request bodies, each about another random shapes image."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng)
        buf = io.BytesIO()
        render_scene(scene).save(buf, "PNG")
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": QUESTIONS["caption"]}]
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 16, "temperature": 0}
        out.append(body)
    return out


def _call(port: int, method: str, path: str, body: dict | None = None) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request(method, path, json.dumps(body) if body else None, {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"{method} {path}: {response.status} {data}")
    return data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(base: str, port: int, batching: bool) -> subprocess.Popen:
    flags = ["--max-batch", "16"] if batching else ["--no-batching"]
    cmd = [sys.executable, "-m", "vlmtune", "serve", "--checkpoint", base, "--port", str(port), "--model-name", MODEL]
    child = subprocess.Popen(cmd + flags)
    deadline = time.monotonic() + 300
    while True:
        try:
            _call(port, "GET", "/health")
            return child
        except OSError:
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                raise RuntimeError("the server did not start") from None
            time.sleep(0.2)


def _round(port: int, clients: int, requests: int, prompts: list[dict]) -> dict:
    before = _call(port, "GET", "/health")["batching"]["batch_sizes"]
    latencies: list[float] = []
    answers: dict[int, str] = {}

    def client(k: int) -> None:
        for i in range(requests):
            n = (k * requests + i) % len(prompts)
            start = time.perf_counter()
            answer = _call(port, "POST", "/v1/chat/completions", prompts[n])
            latencies.append(time.perf_counter() - start)
            answers[n] = answer["choices"][0]["message"]["content"]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    after = _call(port, "GET", "/health")["batching"]["batch_sizes"]
    batches = {int(k): v - before.get(k, 0) for k, v in after.items()}
    calls = sum(batches.values())
    q = statistics.quantiles(latencies, n=20, method="inclusive")
    return {
        "rps": len(latencies) / wall,
        "p50": statistics.median(latencies) * 1000,
        "p95": q[18] * 1000,
        "mean_batch": len(latencies) / calls if calls else 0.0,
        "answers": answers,
        "n": len(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmtune.bench.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels (default 1 4 16)")
    p.add_argument("--requests", type=int, default=8, help="requests per client per level (default 8)")
    args = p.parse_args(argv)
    base = str(ensure_base())
    prompts = _prompts(64)
    ports = {batching: _free_port() for batching in (True, False)}
    children = [_start(base, ports[batching], batching) for batching in (True, False)]
    results: dict[tuple[bool, int], dict] = {}
    try:
        for port in ports.values():
            for body in prompts[:2]:  # warm-up
                _call(port, "POST", "/v1/chat/completions", body)
        for clients in args.clients:
            for batching in (True, False):
                results[batching, clients] = r = _round(ports[batching], clients, args.requests, prompts)
                mode = "batched" if batching else "unbatched"
                print(f"{mode:9} clients={clients:2}: {r['rps']:.2f} req/s, p50 {r['p50']:.0f} ms", flush=True)
    finally:
        for child in children:
            child.terminate()
            child.wait(timeout=60)
    print()
    print(
        "| clients | batching | requests | req/s | p50 ms | p95 ms | mean batch | same answers | req/s ratio | p50 ratio |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for clients in args.clients:
        on, off = results[True, clients], results[False, clients]
        same = sum(on["answers"][n] == off["answers"][n] for n in on["answers"]) / len(on["answers"])
        for batching, r in ((True, on), (False, off)):
            ratio = f"{on['rps'] / off['rps']:.2f}x | {on['p50'] / off['p50']:.2f}x" if batching else "1.00x | 1.00x"
            print(
                f"| {clients} | {'on (max 16)' if batching else 'off'} | {r['n']} | {r['rps']:.2f} | {r['p50']:.0f} | "
                f"{r['p95']:.0f} | {r['mean_batch']:.1f} | {f'{same:.0%}' if batching else '-'} | {ratio} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
