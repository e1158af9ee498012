"""B6: serving under load: 32 concurrent streaming chat clients for 60 s against `llmlab serve`, then the same
requests one at a time.

The server runs in its own process (`llmlab serve` on a free loopback port, the cpu speedrun's assistant by
default); the clients are asyncio tasks with httpx in this process, each asking world questions in a loop
(streaming, temperature 0.7, a seed per request so that both phases produce the same tokens). The
world's answers are short (about 11 tokens), so request overheads weigh heavily; `--min_tokens 64` fixes every
answer's length (the server's `min_tokens` extension masks the end token), as serving benchmarks usually do. Measured per
request: time to first token (first content chunk) and completion tokens (the stream's usage chunk); overall:
errors, tokens/s of all clients together. Phase 2 sends the same request sequence with one client at a time
for the same duration; the ratio of the two throughputs is what continuous batching buys (target >= 5x).

    python bench/b6_serve.py                                   # runs/cpu/sft, 32 clients, 60 s per phase
    python bench/b6_serve.py --clients 8 --seconds 20 --checkpoint runs/tiny/sft
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def questions(world: str, n: int, seed: int) -> list[str]:
    rows = [json.loads(line) for line in (Path(world) / "eval" / "qa.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    return [rng.choice(rows)["question"] for _ in range(n)]


async def one_request(http: httpx.AsyncClient, url: str, model: str, question: str, seed: int,
                      max_tokens: int, min_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "stream": True,
            "temperature": 0.7, "seed": seed, "max_tokens": max_tokens, "min_tokens": min_tokens,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens, error = None, 0, None
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if ttft is None and choice["delta"].get("content"):
                        ttft = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    return {"error": error, "ttft": ttft, "tokens": tokens, "start": start, "end": end}


async def phase(url: str, model: str, prompts: list[str], clients: int, seconds: float, max_tokens: int,
                min_tokens: int = 0) -> dict:
    """`clients` loops, each taking the next request of the shared sequence until `seconds` have passed."""
    results: list[dict] = []
    next_index = 0
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_index
        while time.perf_counter() < deadline and next_index < len(prompts):
            i = next_index
            next_index += 1
            results.append({"i": i, **await one_request(http, url, model, prompts[i], 1000 + i, max_tokens, min_tokens)})

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if not r["error"]]
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in ok)
    per_request = [r["tokens"] / (r["end"] - r["start"]) for r in ok if r["tokens"]]

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {"requests": len(results), "errors": len(results) - len(ok), "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall, "ttft_p50_s": pct(ttfts, 0.5), "ttft_p95_s": pct(ttfts, 0.95),
            "request_tokens_per_s_p50": statistics.median(per_request) if per_request else float("nan"),
            "first_errors": [r["error"] for r in results if r["error"]][:3], "done": sorted(r["i"] for r in ok)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/cpu/sft")
    p.add_argument("--world", default="runs/cpu/world")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0, help="duration of each phase")
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--min_tokens", type=int, default=0,
                   help="mask the end token until this many tokens (fixed-length answers: --min_tokens 64)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the server (0 = its default)")
    p.add_argument("--json", default="")
    args = p.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    db = Path(tempfile.mkdtemp()) / "bench.db"
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    cmd = [sys.executable, "-m", "llmlab", "serve", "--checkpoint", args.checkpoint, "--world", args.world,
           "--port", str(port), "--db", str(db), "--max_batch", str(max(args.clients, 1))]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                sys.exit(f"the server exited: {server.stderr.read()[-2000:]}")
            time.sleep(0.1)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        prompts = questions(args.world, 20_000, seed=0)
        asyncio.run(phase(url, model, prompts[-8:], 2, 5, args.max_tokens))  # warm-up
        print(f"== {args.clients} concurrent streaming clients, {args.seconds:.0f} s", flush=True)
        concurrent = asyncio.run(phase(url, model, prompts, args.clients, args.seconds, args.max_tokens,
                                       args.min_tokens))
        health = httpx.get(url + "/health").json()
        print(f"== the same requests one at a time, {args.seconds:.0f} s", flush=True)
        serial = asyncio.run(phase(url, model, prompts, 1, args.seconds, args.max_tokens, args.min_tokens))
    finally:
        server.terminate()
        server.wait(timeout=30)

    ratio = concurrent["tokens_per_s"] / serial["tokens_per_s"]
    print(f"\n{'':<28}{'concurrent':>14}{'one at a time':>16}")
    for key in ("requests", "errors", "tokens", "tokens_per_s", "ttft_p50_s", "ttft_p95_s", "request_tokens_per_s_p50"):
        c, s = concurrent[key], serial[key]
        fmt = (lambda v: f"{v:,.3f}") if isinstance(c, float) else (lambda v: f"{v:,}")
        print(f"{key:<28}{fmt(c):>14}{fmt(s):>16}")
    print(f"throughput ratio (concurrent / one at a time): {ratio:.1f}x (target >= 5x); "
          f"server mean batch {health['mean_batch']}")
    for e in concurrent["first_errors"] + serial["first_errors"]:
        print("error:", e)
    if args.json:
        out = {"clients": args.clients, "seconds": args.seconds, "min_tokens": args.min_tokens, "ratio": ratio, "mean_batch": health["mean_batch"],
               **{f"concurrent_{k}": v for k, v in concurrent.items() if k not in ("done", "first_errors")},
               **{f"serial_{k}": v for k, v in serial.items() if k not in ("done", "first_errors")}}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
