"""Load generator against a real `trimode serve` (Triton): N concurrent streaming clients, mixed requests.

    python benchmarks/load_triton.py [--model DIR] [--clients 1,4,16] [--requests 48] [--seed 0]

Starts `trimode serve MODEL` (the real CLI, Triton's gRPC front end), builds a seeded workload of requests
with mixed modes (ar, spec, quad, diffusion), block lengths, prompt lengths and max_tokens, and for each
client count N runs N streaming gRPC clients, each sending its share of the requests one after another with
seeded random pauses (arrivals at random times). N = 1 is "one at a time". Reports throughput (generated
tokens / wall time), time to first token and inter-token latency (p50, p99), each request's TTFT against its
own solo TTFT (a diffusion request's first token comes only when its first block is finished, so TTFTs are
compared request by request), checks every response equals the same request's solo output (from the N = 1
run), and prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def workload(count: int, seed: int, prompts: list[str], modes: list[str]) -> list[dict]:
    rng = random.Random(seed)
    jobs = []
    for number in range(count):
        mode = modes[number % len(modes)]
        text = rng.choice(prompts)
        text = text[: rng.randint(max(8, len(text) // 3), len(text))]
        block = 16 if mode == "diffusion" else rng.choice([4, 8])
        jobs.append({"id": number, "text_input": text, "mode": mode, "block_length": block,
                     "max_tokens": rng.choice([16, 32, 48]), "pause_s": rng.expovariate(1 / 0.05)})
    return jobs


def stream_one(client, grpcclient, job: dict, timeout: float) -> dict:
    values = {"text_input": job["text_input"], "mode": job["mode"], "block_length": job["block_length"],
              "max_tokens": job["max_tokens"], "stream": True}
    inputs = []
    for name, value in values.items():
        if isinstance(value, str):
            array, kind = np.array([value.encode()], dtype=np.object_), "BYTES"
        elif isinstance(value, bool):
            array, kind = np.asarray([value], dtype=np.bool_), "BOOL"
        else:
            array, kind = np.asarray([value], dtype=np.int32), "INT32"
        item = grpcclient.InferInput(name, list(array.shape), kind)
        item.set_data_from_numpy(array)
        inputs.append(item)
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((time.perf_counter(), result, error)))
    start = time.perf_counter()
    times, tokens = [], []
    try:
        client.async_stream_infer("trimode", inputs)
        while True:
            at, result, error = replies.get(timeout=timeout)
            if error is not None:
                raise RuntimeError(error.message())
            ids = result.as_numpy("output_ids")
            if ids is not None and ids.size:
                times.append(at)
                tokens.extend(int(t) for t in ids)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"id": job["id"], "tokens": tokens, "ttft": (times[0] - start) if times else float("nan"),
            "itl": gaps, "end": time.perf_counter()}


def run_clients(url: str, jobs: list[dict], clients: int, timeout: float) -> dict:
    import tritonclient.grpc as grpcclient

    shares = [jobs[i::clients] for i in range(clients)]
    results: list[dict] = []
    lock = threading.Lock()
    errors: list[str] = []

    def client_loop(share: list[dict]) -> None:
        client = grpcclient.InferenceServerClient(url)
        try:
            for job in share:
                time.sleep(job["pause_s"])
                try:
                    out = stream_one(client, grpcclient, job, timeout)
                except Exception as exc:  # reported, never hidden
                    with lock:
                        errors.append(f"request {job['id']}: {exc}")
                    continue
                with lock:
                    results.append(out)
        finally:
            client.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    total = sum(len(r["tokens"]) for r in results)
    ttfts = [r["ttft"] for r in results]
    itls = [g for r in results for g in r["itl"]]
    return {"clients": clients, "requests": len(results), "errors": errors, "wall_s": round(wall, 3),
            "tokens": total, "tokens_per_s": round(total / wall, 2),
            "ttft_ms": {"p50": round(1e3 * percentile(ttfts, 50), 2), "p99": round(1e3 * percentile(ttfts, 99), 2)},
            "itl_ms": {"p50": round(1e3 * percentile(itls, 50), 2), "p99": round(1e3 * percentile(itls, 99), 2)},
            "outputs": {r["id"]: r["tokens"] for r in results}, "ttfts": {r["id"]: r["ttft"] for r in results}}


def wait_ready(http: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"trimode serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://{http}/v2/health/ready", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("trimode serve did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="engine or checkpoint (default: the demo model)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="ar,spec,quad,diffusion", help="modes of the requests, in turn")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--max-step-tokens", type=int, default=0, help="the server's step budget (0: default)")
    parser.add_argument("--schedule-policy", default="prefill-first", help="the server's --schedule-policy")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from trimode.demo import demo_model_path
    from trimode.runtime.serving.triton.server import free_port

    model = args.model or str(demo_model_path())
    prompts = json.loads((ROOT / "examples/train_demo/prompts.json").read_text())
    prompts = [p["prompt"] if isinstance(p, dict) else p for p in prompts]
    jobs = workload(args.requests, args.seed, prompts, args.modes.split(","))
    counts = [int(c) for c in args.clients.split(",")]
    http, grpc, metrics = free_port(), free_port(), free_port()
    command = [sys.executable, "-m", "trimode", "serve", model, "--http-port", str(http), "--grpc-port", str(grpc),
               "--metrics-port", str(metrics), "--threads", str(args.threads), "--dtype", "fp32",
               "--max-batch-size", str(max(counts)), "--device", "cpu"]
    if args.max_step_tokens:
        command += ["--max-step-tokens", str(args.max_step_tokens)]
    command += ["--schedule-policy", args.schedule_policy]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        wait_ready(f"127.0.0.1:{http}", server)
        run_clients(f"127.0.0.1:{grpc}", jobs[:4], 1, args.timeout)  # warm-up
        runs = [run_clients(f"127.0.0.1:{grpc}", jobs, n, args.timeout) for n in counts]
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    solo, solo_ttft = runs[0]["outputs"], runs[0]["ttfts"]
    mode_of = {job["id"]: job["mode"] for job in jobs}
    for run in runs:
        run["ttft_ms_by_mode"] = {
            mode: {"p50": round(1e3 * percentile([t for k, t in run["ttfts"].items() if mode_of[k] == mode], 50), 2),
                   "p99": round(1e3 * percentile([t for k, t in run["ttfts"].items() if mode_of[k] == mode], 99), 2)}
            for mode in sorted(set(mode_of.values()))}
        run["all_equal_solo"] = all(run["outputs"].get(k) == v for k, v in solo.items()) and \
            len(run["outputs"]) == len(solo)
        ratios = [run["ttfts"][k] / solo_ttft[k] for k in run["ttfts"] if k in solo_ttft]
        run["ttft_over_solo_per_request"] = {"p50": round(percentile(ratios, 50), 2),
                                             "p99": round(percentile(ratios, 99), 2)}
        del run["outputs"], run["ttfts"]
    base = runs[0]
    report = {"benchmark": "load_triton", "date": date.today().isoformat(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "model": model, "server_threads": args.threads, "requests": len(jobs),
              "max_step_tokens": args.max_step_tokens or "default", "schedule_policy": args.schedule_policy,
              "modes": args.modes,
              "command": " ".join(["python", "benchmarks/load_triton.py"] + sys.argv[1:]), "runs": runs,
              "ratios_vs_one_at_a_time": {
                  str(r["clients"]): {"throughput": round(r["tokens_per_s"] / base["tokens_per_s"], 2),
                                      "p99_ttft_over_solo_p99_ttft": round(r["ttft_ms"]["p99"] /
                                                                           base["ttft_ms"]["p99"], 2),
                                      "p99_of_per_request_ttft_ratio": r["ttft_over_solo_per_request"]["p99"]}
                  for r in runs}}
    print(json.dumps(report, indent=2))
    if any(r["errors"] for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
