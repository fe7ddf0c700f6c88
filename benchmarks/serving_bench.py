"""Third-party serving benchmarks (NVIDIA AIPerf, GuideLLM) against `trimode serve --api openai`; prints JSON.

Each tool runs from its own environment: `make aiperf-env` (.venv-aiperf/, no torch) and `make guidellm-env`
(.venv-guidellm/, with the CPU torch put in first, since GuideLLM would otherwise pull a CUDA build). Each run
sends a bounded synthetic load (`--requests` prompts of `--isl` tokens, `--osl` new tokens each, `--concurrency`
at a time, streamed, `ignore_eos: true` so that every request generates exactly `--osl` tokens) to a server on
this machine, and the tool's token counts are checked against the server's own counters in /metrics
(before/after deltas of trimode_prompt_tokens_total, trimode_generation_tokens_total and
trimode_requests_finished_total), with no errors and no answer other than 200 from /v1/.

AIPerf (`--tool aiperf`, the default):
- `completions-usage`: /v1/completions; AIPerf reads the server's usage from the stream's last chunk
  (`--use-server-token-count`: `stream_options.include_usage`);
- `chat-usage`: /v1/chat/completions; AIPerf reads the usage the server puts on every chunk
  (`--use-server-token-count --per-chunk-usage`: `stream_options.continuous_usage_stats`);
- `completions`: /v1/completions; AIPerf counts tokens itself with the model's tokenizer (its default). Its
  prompt tokens must equal the server's; its output count re-tokenizes the streamed text, which need not give
  back the tokens generated (the demo model's ` re` `cur` `sive` comes back as one ` recursive`), so that
  difference is reported (`output_retokenized_diff`), not failed;
- `chat` (not run by default): AIPerf's own count on chat does not see the chat template's tokens, so its prompt
  tokens fall short of the server's by design; it shows that the comparison does catch a difference.

GuideLLM (`--tool guidellm`): `guidellm-completions` and `guidellm-chat`, a concurrent profile; GuideLLM sends
`stream_options` with `continuous_usage_stats` and `ignore_eos` itself and prefers the server's usage.

Without `--base-url` it starts `trimode serve MODEL --api openai` itself on a free loopback port (`--model`,
default the demo model) and stops it at the end. Exit status 0 when every run passed its checks.

    make aiperf-env
    python benchmarks/serving_bench.py --requests 32 --concurrency 4 --isl 32 --osl 32
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "trimode" / "demo_model"
TOOLS = {"aiperf": REPO / ".venv-aiperf" / "bin" / "aiperf", "guidellm": REPO / ".venv-guidellm" / "bin" / "guidellm"}
COUNTERS = {"prompt_tokens": "trimode_prompt_tokens_total", "generation_tokens": "trimode_generation_tokens_total",
            "requests_finished": "trimode_requests_finished_total"}


@dataclass(frozen=True)
class Run:
    tool: str
    endpoint: str           # "completions" or "chat"
    server_usage: bool      # the tool's counts are the usage the server streamed (else its own tokenizer's)
    per_chunk: bool = False  # usage on every chunk (continuous_usage_stats)


RUNS = {"completions-usage": Run("aiperf", "completions", True), "chat-usage": Run("aiperf", "chat", True, True),
        "completions": Run("aiperf", "completions", False), "chat": Run("aiperf", "chat", False),
        "guidellm-completions": Run("guidellm", "completions", True, True),
        "guidellm-chat": Run("guidellm", "chat", True, True)}
DEFAULT_RUNS = {"aiperf": "completions-usage,chat-usage,completions", "guidellm": "guidellm-completions,guidellm-chat"}


def get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a loopback URL of our own
        return response.read().decode()


def scrape(base: str) -> tuple[dict[str, float], dict[str, float]]:
    """The server's counters, summed over their labels, and its HTTP answers other than 200 by their labels."""
    totals = dict.fromkeys(COUNTERS, 0.0)
    non_200: dict[str, float] = {}
    for line in get(base + "/metrics").splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        metric = name.split("{", 1)[0]
        for key, counter in COUNTERS.items():
            if metric == counter:
                totals[key] += float(value)
        if metric == "trimode_http_requests_total" and 'status="200"' not in name:
            non_200[name.removeprefix(metric)] = float(value)
    return totals, non_200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, mode: str, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "trimode", "serve", str(model), "--api", "openai", "--host", "127.0.0.1",
               "--http-port", str(port), "--device", "cpu", "--threads", str(threads), "--default-mode", mode]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if json.loads(get(base + "/health", timeout=2)).get("status") == "ok":
                return process, base
        except OSError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit(f"the server did not become healthy in 120 s:\n{log.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def model_name(base: str) -> str:
    return json.loads(get(base + "/v1/models"))["data"][0]["id"]


def tool_env(artifacts: Path) -> dict[str, str]:
    # A local tokenizer folder needs no hub; HF_HUB_OFFLINE would make AIPerf look for it in the hub cache.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(artifacts / "hf"), NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env


def stat(export: dict, key: str, field: str = "avg") -> float | None:
    value = export.get(key)
    return value.get(field) if isinstance(value, dict) else None


def aiperf_command(tool: Path, base: str, model: str, tokenizer: Path, run: Run, args: argparse.Namespace,
                   out: Path) -> list[str]:
    command = [str(tool), "profile", "--model", model, "--url", base, "--endpoint-type", run.endpoint, "--streaming",
               "--tokenizer", str(tokenizer), "--isl", str(args.isl), "--isl-stddev", "0", "--osl", str(args.osl),
               "--osl-stddev", "0", "--request-count", str(args.requests), "--concurrency", str(args.concurrency),
               "--random-seed", str(args.seed), "--ui-type", "none", "--no-gpu-telemetry",
               "--artifact-dir", str(out), "--workers-max", "1", "--record-processor-service-count", "1",
               "--request-timeout-seconds", "120", "--extra-inputs", "ignore_eos:true"]
    if run.server_usage:
        command += ["--use-server-token-count"] + (["--per-chunk-usage"] if run.per_chunk else [])
    return command


def aiperf_results(out: Path, run: Run) -> dict | None:
    export_file = out / "profile_export_aiperf.json"
    if not export_file.exists():
        return None
    export = json.loads(export_file.read_text())
    if run.server_usage:
        client = {"input_tokens": stat(export, "total_usage_prompt_tokens"),
                  "output_tokens": stat(export, "total_usage_completion_tokens")}
    else:
        client = {"input_tokens": stat(export, "total_isl"), "output_tokens": stat(export, "total_osl")}
    return {
        "requests": int(stat(export, "request_count") or 0),
        "errors": sum(int(entry.get("count", 1)) for entry in export.get("error_summary") or []),
        "client": {key: None if value is None else int(value) for key, value in client.items()},
        "request_throughput_rps": stat(export, "request_throughput"),
        "output_token_throughput_tps": stat(export, "output_token_throughput"),
        "ttft_ms": {"avg": stat(export, "time_to_first_token"), "p50": stat(export, "time_to_first_token", "p50"),
                    "p99": stat(export, "time_to_first_token", "p99")},
        "itl_ms": {"avg": stat(export, "inter_token_latency"), "p50": stat(export, "inter_token_latency", "p50")},
        "request_latency_ms": {"avg": stat(export, "request_latency"), "p99": stat(export, "request_latency", "p99")},
        "benchmark_duration_s": stat(export, "benchmark_duration")}


def guidellm_command(tool: Path, base: str, model: str, tokenizer: Path, run: Run, args: argparse.Namespace,
                     out: Path) -> list[str]:
    route = "/v1/completions" if run.endpoint == "completions" else "/v1/chat/completions"
    scenario = {"spec": {
        "backend": {"kind": "openai_http", "target": base, "model": model, "request_format": route, "stream": True,
                    "timeout": 120},
        "tokenizer": {"kind": "huggingface_auto", "model": str(tokenizer)},
        "profile": {"kind": "concurrent", "streams": [args.concurrency]},
        "data": [{"kind": "synthetic_text", "prompt_tokens": args.isl, "output_tokens": args.osl}],
        "seed": {"kind": "static", "value": args.seed},
        "constraints": [{"kind": "max_requests", "count": args.requests}],
        "outputs": [{"kind": "json", "path": str(out / "benchmarks.json")}]}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "scenario.json").write_text(json.dumps(scenario, indent=2))
    return [str(tool), "run", "--scenario", str(out / "scenario.json"), "--disable-console-interactive"]


def guidellm_results(out: Path, run: Run) -> dict | None:
    export_file = out / "benchmarks.json"
    if not export_file.exists():
        return None
    benchmark = json.loads(export_file.read_text())["benchmarks"][0]
    requests = benchmark["requests"]
    done = requests["successful"]
    metrics = benchmark["metrics"]

    def mean(name: str, field: str = "mean") -> float | None:
        value = metrics.get(name, {}).get("successful")
        return value.get(field) if isinstance(value, dict) else None

    return {
        "requests": len(done), "errors": len(requests["errored"]) + len(requests["incomplete"]),
        "client": {"input_tokens": sum(int(r["prompt_tokens"] or 0) for r in done),
                   "output_tokens": sum(int(r["output_tokens"] or 0) for r in done)},
        "request_throughput_rps": mean("requests_per_second"),
        "output_token_throughput_tps": mean("output_tokens_per_second"),
        "ttft_ms": {"avg": mean("time_to_first_token_ms"), "p50": mean("time_to_first_token_ms", "median")},
        "itl_ms": {"avg": mean("inter_token_latency_ms"), "p50": mean("inter_token_latency_ms", "median")},
        "request_latency_ms": {"avg": None if mean("request_latency") is None else 1000 * mean("request_latency")},
        "benchmark_duration_s": benchmark.get("duration")}


def run_tool(name: str, tool: Path, base: str, model: str, tokenizer: Path, args: argparse.Namespace,
             artifacts: Path) -> dict:
    run = RUNS[name]
    out = artifacts / name
    build, results = ((aiperf_command, aiperf_results) if run.tool == "aiperf"
                      else (guidellm_command, guidellm_results))
    command = build(tool, base, model, tokenizer, run, args, out)
    before, before_non_200 = scrape(base)
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=tool_env(artifacts), timeout=args.timeout,
                          stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    time.sleep(0.5)  # a request's counters are updated when it finishes, just after its last byte
    after, after_non_200 = scrape(base)
    server = {key: int(after[key] - before[key]) for key in before}
    non_200 = {labels: int(n - before_non_200.get(labels, 0)) for labels, n in after_non_200.items()}
    server["http_non_200"] = {labels: n for labels, n in non_200.items() if n}
    report: dict = {"name": name, "tool": run.tool, "endpoint": run.endpoint, "server_token_count": run.server_usage,
                    "continuous_usage_stats": run.per_chunk, "ignore_eos": True, "rc": proc.returncode,
                    "wall_s": round(wall, 2), "command": " ".join(command), "server": server}
    found = results(out, run) if proc.returncode == 0 else None
    if found is None:
        report.update(ok=False, errors=None, requests=0, log_tail=(proc.stdout + proc.stderr)[-3000:])
        return report
    report.update(found)
    client = report["client"]
    report["output_retokenized_diff"] = (None if run.server_usage or client["output_tokens"] is None
                                         else client["output_tokens"] - server["generation_tokens"])
    output_equal = not run.server_usage or client["output_tokens"] == server["generation_tokens"]
    # AIPerf probes /metrics with HEAD first (a 405 here) and falls back to GET: only the generation endpoints count.
    failed = {labels: n for labels, n in server["http_non_200"].items() if 'endpoint="/v1/' in labels}
    report["ok"] = (report["errors"] == 0 and not failed and report["requests"] == args.requests
                    and server["requests_finished"] == args.requests
                    and server["generation_tokens"] == args.requests * args.osl and output_equal
                    and client["input_tokens"] == server["prompt_tokens"])
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tool", choices=sorted(TOOLS), default="aiperf")
    parser.add_argument("--runs", help=f"comma-separated, of {', '.join(RUNS)} (default: the tool's: "
                        + "; ".join(f"{tool}: {runs}" for tool, runs in DEFAULT_RUNS.items()) + ")")
    parser.add_argument("--base-url", help="a running server (http://127.0.0.1:PORT); else one is started")
    parser.add_argument("--model", type=Path, default=DEMO, help="checkpoint or engine to serve (default: demo)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder for the tool (default: --model)")
    parser.add_argument("--mode", default="spec", help="--default-mode of a server started here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--isl", type=int, default=32, help="prompt tokens per request")
    parser.add_argument("--osl", type=int, default=32, help="new tokens per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tool-path", type=Path, help="the tool's executable (default: its venv's)")
    parser.add_argument("--artifacts", type=Path, help="the tools' output folders (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one run may take")
    args = parser.parse_args()
    names = (args.runs or DEFAULT_RUNS[args.tool]).split(",")
    wrong = [name for name in names if name not in RUNS or RUNS[name].tool != args.tool]
    if wrong:
        parser.error(f"not a run of {args.tool}: {', '.join(wrong)}")
    tool = args.tool_path or TOOLS[args.tool]
    if not tool.exists():
        print(f"{tool} is absent: run `make {args.tool}-env`", file=sys.stderr)
        return 2
    artifacts = args.artifacts or Path(tempfile.mkdtemp(prefix="serving_bench_"))
    artifacts.mkdir(parents=True, exist_ok=True)
    process = None
    base = args.base_url
    if base is None:
        process, base = start_server(args.model, args.mode, args.threads, artifacts / "server.log")
    try:
        base = base.rstrip("/").removesuffix("/v1")
        model = model_name(base)
        reports = [run_tool(name, tool, base, model, args.tokenizer or args.model, args, artifacts)
                   for name in names]
    finally:
        if process is not None:
            stop_server(process)
    version = subprocess.run([str(tool), "--version"], capture_output=True, text=True).stdout.strip()
    report = {"tool": args.tool, "tool_version": version.splitlines()[-1] if version else None, "base_url": base,
              "model": model, "mode": args.mode if args.base_url is None else None, "requests": args.requests,
              "concurrency": args.concurrency, "isl": args.isl, "osl": args.osl, "artifacts": str(artifacts),
              "runs": reports, "ok": all(r["ok"] for r in reports)}
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
