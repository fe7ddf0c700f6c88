"""`trimode triton-repo` and `trimode serve`: Triton Inference Server, or (`--api openai`) an OpenAI-compatible
HTTP server."""

from __future__ import annotations

import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from .cli_options import cache_options
from .runtime.request import MODES
from .runtime.serving.triton.repo import DEFAULT_MODEL_NAME, SYNC_SUFFIX, write_triton_repo


def repo_options(function: Any) -> Any:
    """The options shared by both commands: what goes into config.pbtxt."""
    options = [
        click.option("--model-name", default=DEFAULT_MODEL_NAME, show_default=True,
                     help="Name of the (decoupled, streaming) model in the repository."),
        click.option("--sync-model", is_flag=True,
                     help=f"Also write MODEL_NAME{SYNC_SUFFIX}, non-decoupled, for plain HTTP/gRPC infer calls "
                          "(a second copy of the engine in memory)."),
        click.option("--instance-count", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Model instances (each holds the engine and batches its own requests)."),
        click.option("--max-step-tokens", type=click.IntRange(min=0), default=0,
                     help="Most tokens one forward carries; longer prompts are prefilled in chunks (0: the "
                          "engine's default)."),
        click.option("--max-batch-size", type=click.IntRange(min=0), default=0,
                     help="Most rows one step carries, and so requests running at once (0: the engine's maximum); "
                          "the KV memory they share is --kv-cache-memory."),
        click.option("--max-seq-len", type=click.IntRange(min=0), default=0,
                     help="Serve at most this many positions per sequence (0: the engine's maximum)."),
        click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True,
                     help="Serving dtype when ENGINE_DIR is a checkpoint (auto: the checkpoint's own, as generate "
                          "and build use; an engine keeps its own)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="torch device of the engine (auto: cuda when available)."),
        click.option("--lora/--no-lora", default=True, show_default=True,
                     help="Use the draft adapter in self-speculation, if the engine has one."),
        click.option("--schedule-policy", type=click.Choice(["prefill-first", "decode-first"]),
                     default="prefill-first", show_default=True,
                     help="prefill-first: a step with prompts to prefill carries those prefills alone (short "
                          "steps, so a short time to first token; decode rows run at least every other step); "
                          "decode-first: running requests' rows fill each step before new prompts. Outputs are "
                          "the same; see benchmarks/RESULTS.md."),
        click.option("--max-row-tokens", type=click.IntRange(min=0), default=512, show_default=True,
                     help="Most tokens one row of one request may carry (a quad row is L(L+1), an infill row its "
                          "hole plus suffix, spec and diffusion rows their block); wider requests are refused, so "
                          "no single request makes every step long (0: the step size)."),
        click.option("--max-queued-jobs", type=click.IntRange(min=0), default=1024, show_default=True,
                     help="Most jobs (prompts x n) waiting for admission; a request that would exceed it is refused "
                          "(HTTP 429, Triton UNAVAILABLE) (0: no limit)."),
        click.option("--default-mode", type=click.Choice(MODES), default="spec", show_default=True,
                     help="Mode of requests that do not say."),
        click.option("--default-max-tokens", type=click.IntRange(min=1), default=64, show_default=True,
                     help="max_tokens of requests that do not say."),
        click.option("--threads", "--torch-threads", "torch_threads", type=click.IntRange(min=0), default=0,
                     help="torch CPU threads per model instance (0: torch's default; see README, Threads)."),
        click.option("--generation-config", type=click.Choice(["auto", "none"]), default="auto", show_default=True,
                     help="auto: the checkpoint's generation_config.json supplies temperature, top_p, top_k and "
                          "repetition_penalty where a request leaves them out (as vLLM's --generation-config "
                          "auto); none: ignore it (requests that leave them out are greedy, unpenalised)."),
    ]
    for option in reversed(options):
        function = option(function)
    return cache_options(function)


def _write(engine_dir: Path, repo: Path, force: bool, **kw: Any) -> list[Path]:
    from .runtime.backends.devices import resolve_device
    from .runtime.cache.sizing import parse_size

    if kw["kv_cache_memory"]:
        parse_size(kw["kv_cache_memory"])  # a bad size is refused here, not inside tritonserver
    settings = {"dtype": kw["dtype"], "device": resolve_device(kw["device"]), "use_lora": kw["lora"],
                "max_batch_size": kw["max_batch_size"], "max_seq_len": kw["max_seq_len"],
                "max_step_tokens": kw["max_step_tokens"], "default_mode": kw["default_mode"],
                "default_max_tokens": kw["default_max_tokens"], "torch_threads": kw["torch_threads"],
                "kv_cache_memory": kw["kv_cache_memory"] or "", "page_size": kw["page_size"] or 0,
                "prefix_caching": kw["prefix_cache"], "schedule_policy": kw["schedule_policy"],
                "max_row_tokens": kw["max_row_tokens"], "max_queued_jobs": kw["max_queued_jobs"],
                "drain_dir": str(kw.get("drain_dir") or ""), "generation_config": kw["generation_config"]}
    try:
        return write_triton_repo(engine_dir, repo, model_name=kw["model_name"], sync_model=kw["sync_model"],
                                 instance_count=kw["instance_count"], force=force, **settings)
    except (FileExistsError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None


@click.command("triton-repo")
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "repo", type=click.Path(path_type=Path), required=True,
              help="Model repository to write into (created if absent; other models in it are kept).")
@click.option("--force", is_flag=True, help="Replace model directories of the same name.")
@click.option("--drain-dir", type=click.Path(path_type=Path), default=None,
              help="A folder the model watches: writing a file STOP there (its text: seconds in-flight requests may "
                   "still take) drains it before you stop tritonserver - new requests are refused and every stream "
                   "gets a final response (trimode serve does this itself).")
@repo_options
def triton_repo_command(engine_dir: Path, repo: Path, force: bool, **kw: Any) -> None:
    """Write a Triton model repository (Python backend, decoupled) serving ENGINE_DIR in every mode (ar,
    diffusion, spec, quad, infill; chosen per request).

    ENGINE_DIR is an engine (`trimode build`) or a checkpoint directory; its absolute path is stored in
    config.pbtxt, and 1/model.py imports the serving code from the installed trimode package.
    """
    for model_dir in _write(engine_dir, repo, force, **kw):
        click.echo(f"wrote {model_dir}/config.pbtxt and {model_dir}/1/model.py")


class _Stop(Exception):
    """SIGTERM arrived: shut down like on Ctrl-C."""


@click.command("serve")
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--api", type=click.Choice(["triton", "openai", "dynamo"]), default="triton", show_default=True,
              help="triton: Triton Inference Server (HTTP, gRPC, metrics ports); openai: an OpenAI-compatible HTTP "
                   "server on --host:--http-port (/v1/completions, /v1/chat/completions, /v1/models, /health, "
                   "/metrics), see examples/openai/; dynamo: an NVIDIA Dynamo worker behind `python -m "
                   "dynamo.frontend` (models NAME, NAME:ar, NAME:spec, NAME:quad, NAME:diffusion; `make dynamo`, "
                   "docs/scale-out.md).")
@click.option("--served-model-name", default=None,
              help="[openai, dynamo] The model name clients use (default: the engine directory's name).")
@click.option("--discovery-backend", type=click.Choice(["file", "etcd", "kubernetes"]), default="file",
              show_default=True,
              help="[dynamo] How the frontend finds this worker: file (a folder shared with the frontend, "
                   "DYN_FILE_KV), etcd (ETCD_ENDPOINTS) or kubernetes (Dynamo's operator).")
@click.option("--event-plane", "dynamo_event_plane", type=click.Choice(["zmq", "nats"]), default=None,
              help="[dynamo] How KV events reach the router: zmq (direct sockets) or nats (NATS_SERVER); default: "
                   "Dynamo's choice (DYN_EVENT_PLANE, else zmq). The frontend takes the same --event-plane.")
@click.option("--namespace", "dynamo_namespace", default="dynamo", show_default=True,
              help="[dynamo] Dynamo namespace the worker registers in.")
@click.option("--block-length", "dynamo_block_length", default=None,
              help="[dynamo] Block length of every request (an integer, or auto for spec/quad; default: the "
                   "model's block_size): the stock frontend has no field for it.")
@click.option("--threshold", "dynamo_threshold", type=click.FloatRange(0, 1), default=None,
              help="[dynamo] Confidence threshold of diffusion commits and draft passes for every request.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="On SIGTERM/Ctrl-C, seconds in-flight requests may take to finish before they are cancelled "
                   "(each still gets a final response with finish reason \"cancelled\").")
@click.option("--max-jobs-per-request", type=click.IntRange(min=0), default=256, show_default=True,
              help="[openai] Most generations (prompts x n) one request may ask for (0: no limit).")
@click.option("--max-request-bytes", "--max-body-size", "max_body_size", default="16MiB", show_default=True,
              help="Largest HTTP request body (bytes, or 512KiB, 16MiB, ...); a larger one gets 413 at once (before "
                   "it is read when its Content-Length says so, else as soon as it passes the limit). "
                   "--max-body-size is the same option.")
@click.option("--header-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds a connection has to send a request's headers before it is closed (408).")
@click.option("--body-timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Seconds a request has to send its body once its headers are in before it is closed.")
@click.option("--http-guard/--no-http-guard", default=True, show_default=True,
              help="[triton] Serve --http-port through trimode's HTTP endpoint (body limits, JSON checks, read "
                   "timeouts; tritonserver's own HTTP on a loopback port behind it). Without it tritonserver "
                   "serves the port itself, and a deeply nested JSON body crashes it.")
@click.option("--repo", type=click.Path(path_type=Path), default=None,
              help="Write the model repository here and keep it (default: a temporary folder).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the HTTP, gRPC and metrics endpoints bind (0.0.0.0 for every interface).")
@click.option("--http-port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True,
              help="0 picks a free port.")
@click.option("--grpc-port", type=click.IntRange(min=0, max=65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), default=8002, show_default=True)
@click.option("--startup-timeout", type=float, default=300.0, show_default=True,
              help="Seconds to wait for the server to report ready.")
@click.option("--log-file", type=click.Path(path_type=Path), default=None,
              help="tritonserver's log (default: a file in the temporary folder, shown on failure).")
@click.option("--log-verbose", type=click.IntRange(min=0), default=0, show_default=True)
@repo_options
def serve_command(engine_dir: Path, api: str, served_model_name: str | None, shutdown_timeout: float,
                  max_jobs_per_request: int, max_body_size: str, header_timeout: float,
                  body_timeout: float,
                  http_guard: bool, repo: Path | None, host: str, http_port: int, grpc_port: int, metrics_port: int,
                  startup_timeout: float, log_file: Path | None, log_verbose: int, **kw: Any) -> None:
    """Serve ENGINE_DIR with Triton Inference Server (or, with --api openai, an OpenAI-compatible server) until
    Ctrl-C or SIGTERM (which drain in-flight requests, stop the server and exit 0)."""
    from .runtime.cache.sizing import parse_size
    from .runtime.serving.http_limits import HttpLimits

    try:
        limits = HttpLimits(parse_size(max_body_size), header_timeout, body_timeout)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-request-bytes") from None
    if api == "dynamo":
        _serve_dynamo(engine_dir, served_model_name, max_jobs_per_request, **kw)
        return
    if api == "openai":
        _serve_openai(engine_dir, host, http_port, served_model_name, shutdown_timeout, log_verbose,
                      limits=limits, max_jobs_per_request=max_jobs_per_request, **kw)
        return
    from .runtime.serving.openai.server import bind_socket
    from .runtime.serving.triton.deployment import TritonDeployment
    from .runtime.serving.triton.server import TritonServer, TritonStartError, TritonUnavailable

    with tempfile.TemporaryDirectory(prefix="trimode-repo-") as scratch:
        repo_dir = repo if repo is not None else Path(scratch) / "repo"
        drain_dir = Path(scratch) / "drain"
        _write(engine_dir, repo_dir, True, drain_dir=drain_dir, **kw)
        sock = None
        if http_guard:
            try:
                sock = bind_socket(host, http_port)
            except OSError as exc:
                raise click.ClickException(str(exc)) from None
        server = TritonServer(repo_dir.resolve(), 0 if http_guard else http_port, grpc_port, metrics_port, host=host,
                              log_path=log_file.resolve() if log_file else None, log_verbose=log_verbose)
        models = [kw["model_name"]] + ([kw["model_name"] + SYNC_SUFFIX] if kw["sync_model"] else [])
        deployment = TritonDeployment(server, sock, limits, drain_dir, shutdown_timeout, tuple(models))

        def on_term(signum: int, frame: Any) -> None:
            raise _Stop()

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            try:
                deployment.start(timeout_s=startup_timeout)
            except (TritonUnavailable, TritonStartError, RuntimeError) as exc:
                raise click.ClickException(str(exc)) from None
            click.echo(f"tritonserver ready: HTTP {deployment.http_url}, gRPC {server.grpc_url}, metrics "
                       f"{host}:{server.metrics_port}; models {', '.join(models)}; log {server.log_path}")
            click.echo("Ctrl-C stops it.")
            while deployment.running():
                time.sleep(0.5)
            code = server.process.returncode if server.process is not None else 1
            raise click.ClickException(f"tritonserver exited on its own (status {code}); log tail:\n"
                                       f"{server.log_tail()}")
        except (KeyboardInterrupt, _Stop):
            click.echo(f"stopping: in-flight requests have {shutdown_timeout:g}s to finish ...", err=True)
            code = deployment.stop()
            click.echo(f"tritonserver stopped (status {code})", err=True)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
            deployment.stop()
            signal.signal(signal.SIGTERM, previous)
            if sock is not None:
                sock.close()


def _serve_openai(engine_dir: Path, host: str, http_port: int, served_model_name: str | None,
                  shutdown_timeout: float, log_verbose: int, limits: Any, max_jobs_per_request: int,
                  generation_config: str = "auto", **kw: Any) -> None:
    """`--api openai`: load the engine in this process and serve it with uvicorn until SIGTERM / Ctrl-C."""
    from .cli_options import engine_cache_kwargs
    from .runtime.backends.devices import resolve_device
    from .runtime.backends.engine_loader import open_engine
    from .runtime.serving.frontend import Frontend, ServingLimits
    from .runtime.serving.openai.metrics import ServerMetrics
    from .runtime.serving.openai.server import OpenAIServer, bind_socket, run_server

    try:
        sock = bind_socket(host, http_port)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    if kw["torch_threads"]:
        import torch

        torch.set_num_threads(kw["torch_threads"])
    engine = open_engine(engine_dir, dtype=kw["dtype"], use_lora=kw["lora"], device=resolve_device(kw["device"]),
                         max_batch_size=kw["max_batch_size"] or None, max_seq_len=kw["max_seq_len"] or None,
                         **engine_cache_kwargs(kw["kv_cache_memory"], kw["page_size"], kw["prefix_cache"]))
    frontend = Frontend(engine, default_mode=kw["default_mode"], default_max_tokens=kw["default_max_tokens"],
                        use_lora=kw["lora"], metrics=ServerMetrics(), max_step_tokens=kw["max_step_tokens"],
                        max_batch_size=kw["max_batch_size"] or None, policy=kw["schedule_policy"],
                        limits=ServingLimits(kw["max_row_tokens"] or None, max_jobs_per_request or None,
                                             kw["max_queued_jobs"] or None),
                        generation_config=generation_config)
    name = served_model_name or Path(engine_dir).resolve().name
    server = OpenAIServer(frontend, name, shutdown_timeout_s=shutdown_timeout, http_limits=limits)
    port = sock.getsockname()[1]

    def ready() -> None:
        limits = engine.limits
        click.echo(f"trimode OpenAI-compatible server ready: http://{host}:{port}/v1 (model '{name}', max batch "
                   f"{limits.max_batch_size}, max length {limits.max_seq_len}, KV cache {limits.kv_pages} pages of "
                   f"{limits.page_size}); Ctrl-C or SIGTERM stops it", err=True)

    run_server(server, sock, log_level="info" if log_verbose else "warning", on_ready=ready)
    click.echo("trimode OpenAI-compatible server stopped", err=True)


def _serve_dynamo(engine_dir: Path, served_model_name: str | None, max_jobs_per_request: int, **kw: Any) -> None:
    """`--api dynamo`: load the engine in this process and serve it as Dynamo workers until SIGTERM / Ctrl-C."""
    try:
        from .runtime.serving.dynamo.worker import open_deployment, serve
    except ImportError as exc:
        raise click.ClickException(f"--api dynamo needs NVIDIA Dynamo (make dynamo): {exc}") from None
    from .cli_options import engine_cache_kwargs
    from .runtime.serving.frontend import ServingLimits

    if kw["torch_threads"]:
        import torch

        torch.set_num_threads(kw["torch_threads"])
    block_length = kw["dynamo_block_length"]
    if block_length is not None and block_length != "auto":
        try:
            block_length = int(block_length)
        except ValueError:
            raise click.BadParameter("an integer or auto", param_hint="--block-length") from None
    deployment = open_deployment(
        engine_dir, served_model_name, dtype=kw["dtype"], use_lora=kw["lora"], device=kw["device"],
        max_batch_size=kw["max_batch_size"] or None, max_seq_len=kw["max_seq_len"] or None,
        cache=engine_cache_kwargs(kw["kv_cache_memory"], kw["page_size"], kw["prefix_cache"]),
        default_mode=kw["default_mode"], default_max_tokens=kw["default_max_tokens"],
        max_step_tokens=kw["max_step_tokens"] or None, policy=kw["schedule_policy"],
        limits=ServingLimits(kw["max_row_tokens"] or None, max_jobs_per_request or None, kw["max_queued_jobs"] or None),
        generation_config=kw.get("generation_config", "auto"), block_length=block_length,
        threshold=kw["dynamo_threshold"],
        namespace=kw["dynamo_namespace"], discovery_backend=kw["discovery_backend"],
        event_plane=kw["dynamo_event_plane"])
    limits = deployment.engine.limits
    names = ", ".join(name for name, _ in deployment.models)
    click.echo(f"trimode Dynamo worker: models {names} (max batch {limits.max_batch_size}, max length "
               f"{limits.max_seq_len}, KV cache {limits.kv_pages} pages of {limits.page_size}); discovery "
               f"{kw['discovery_backend']}, namespace {kw['dynamo_namespace']}; SIGTERM stops it", err=True)
    serve(deployment)
    click.echo("trimode Dynamo worker stopped", err=True)


COMMANDS = [triton_repo_command, serve_command]
