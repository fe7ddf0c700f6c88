"""Two trimode Dynamo workers against one, behind Dynamo's KV-aware router; prints JSON.

For each configuration (`--configs`, default `1:kv,2:kv,2:round-robin`: workers and the frontend's router
mode) it starts `python -m dynamo.frontend` and that many `trimode serve MODEL --api dynamo` workers (file
discovery in a temporary folder, loopback, `--threads` torch threads each), sends the same workload and stops
everything. The workload: `--docs` documents of about 150 tokens, `--questions` questions each, one request
per (document, question), in a fixed shuffled order, `--concurrency` streams at a time, greedy, `--max-tokens`
each, served model MODEL_NAME:`--mode`. Greedy outputs are the same whatever the worker, so every
configuration generates the same tokens.

Reported per configuration: wall time, output tokens per second, requests per second, mean and p50/p90 time
to first token and latency, the prefix-hit rate (cached prompt tokens over prompt tokens, from each response's
usage.prompt_tokens_details.cached_tokens) and how many requests each worker served (its log). With KV
routing, a document's later questions go to the worker that holds its pages, so two workers keep the hit rate
of one; round-robin spreads them and loses part of it.

    python benchmarks/dynamo_scale.py --concurrency 16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# the documents and the loopback helpers are the integration tests' own, so both measure the same workload
from tests.test_dynamo import HOST, document, free_port  # noqa: E402


def environment(store: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DYN_FILE_KV=str(store), DYN_TCP_RPC_HOST=HOST, DYN_EVENT_PLANE_HOST=HOST,
               DYN_TCP_RESPONSE_STREAM_HOST=HOST, DYN_SELF_HOST_METADATA="0", OMP_NUM_THREADS=str(threads),
               DYN_LOG="info", NO_COLOR="1")
    return env


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def one_request(base: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.monotonic()
    first, usage, text = None, None, ""
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if choice.get("text") and first is None:
                    first = time.monotonic() - start
                text += choice.get("text") or ""
    if usage is None:
        raise RuntimeError("no usage in the stream")
    return {"ttft": first, "latency": time.monotonic() - start, "usage": usage, "text": text}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_config(args: argparse.Namespace, workers: int, router: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="trimode-dynamo-bench-") as scratch:
        scratch = Path(scratch)
        store = scratch / "store"
        store.mkdir()
        env = environment(store, args.threads)
        port = free_port()
        base = f"http://{HOST}:{port}"
        frontend = subprocess.Popen([sys.executable, "-m", "dynamo.frontend", "--router-mode", router,
                                     "--discovery-backend", "file", "--http-host", HOST, "--http-port", str(port),
                                     *args.frontend_args.split()],
                                    stdout=(scratch / "frontend.log").open("w"), stderr=subprocess.STDOUT, env=env)
        procs, logs = [], []
        try:
            for i in range(workers):
                log = scratch / f"worker{i}.log"
                logs.append(log)
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "trimode", "serve", str(args.model), "--api", "dynamo",
                     "--served-model-name", args.name, "--discovery-backend", "file", "--device", "cpu",
                     "--threads", str(args.threads), "--max-batch-size", str(max(16, args.concurrency))],
                    stdout=log.open("w"), stderr=subprocess.STDOUT, env=env))
            model = f"{args.name}:{args.mode}"
            deadline = time.monotonic() + 300
            while True:
                instances = store / "v1" / "instances"
                count = len(list(instances.iterdir())) if instances.is_dir() else 0
                try:
                    ids = {m["id"] for m in httpx.get(base + "/v1/models", timeout=5).json()["data"]}
                except (httpx.HTTPError, ValueError, KeyError):
                    ids = set()
                if count >= 5 * workers and model in ids:
                    break
                if time.monotonic() > deadline or any(p.poll() is not None for p in [frontend, *procs]):
                    raise RuntimeError("the deployment did not come up")
                time.sleep(0.5)
            time.sleep(2.0)
            for i in range(2 * workers):  # warm-up, unrelated to the documents
                one_request(base, model, f"Warm-up {i}: hello there", 4)
            received = [log.read_text(errors="replace").count("request received") for log in logs]
            requests = [(d, q) for d in range(args.docs) for q in range(args.questions)]
            random.Random(0).shuffle(requests)
            prompts = [document(d) + f" Question {q}: what does word {q + 1} say?" for d, q in requests]
            start = time.monotonic()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(lambda p: one_request(base, model, p, args.max_tokens), prompts))
            wall = time.monotonic() - start
            served = [log.read_text(errors="replace").count("request received") - before
                      for log, before in zip(logs, received, strict=True)]
        finally:
            for process in procs:
                stop(process)
            stop(frontend)
    prompt = sum(r["usage"]["prompt_tokens"] for r in results)
    cached = sum((r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0 for r in results)
    output = sum(r["usage"]["completion_tokens"] for r in results)
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    latency = [r["latency"] for r in results]
    return {"workers": workers, "router": router, "frontend_args": args.frontend_args, "requests": len(results),
            "concurrency": args.concurrency,
            "wall_s": round(wall, 2), "output_tokens": output, "output_tok_s": round(output / wall, 1),
            "req_s": round(len(results) / wall, 2), "ttft_mean_s": round(statistics.mean(ttft), 3),
            "ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p90_s": round(percentile(ttft, 0.9), 3),
            "latency_mean_s": round(statistics.mean(latency), 3), "latency_p90_s": round(percentile(latency, 0.9), 3),
            "prompt_tokens": prompt, "cached_tokens": cached, "prefix_hit_rate": round(cached / prompt, 3),
            "served_per_worker": served, "texts_sha": hash_texts(results),
            "texts": {p: r["text"] for p, r in zip(prompts, results, strict=True)} if args.save_texts else None}


def hash_texts(results: list[dict]) -> str:
    import hashlib

    return hashlib.sha256("\x00".join(r["text"] for r in results).encode()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "trimode" / "demo_model")
    parser.add_argument("--name", default="demo")
    parser.add_argument("--mode", default="ar", choices=["ar", "spec", "quad", "diffusion"])
    parser.add_argument("--configs", default="1:kv,2:kv,2:round-robin")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--frontend-args", default="", help="more options of dynamo.frontend (one string)")
    parser.add_argument("--save-texts", action="store_true", help="put every output text in the JSON")
    args = parser.parse_args()
    runs = []
    for spec in args.configs.split(","):
        workers, router = spec.split(":")
        runs.append(run_config(args, int(workers), router))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "texts"}), file=sys.stderr, flush=True)
    same = len({r["texts_sha"] for r in runs}) == 1
    print(json.dumps({"runs": runs, "same_outputs": same, "loadavg": os.getloadavg(), "cpus": os.cpu_count()},
                     indent=2))


if __name__ == "__main__":
    main()
