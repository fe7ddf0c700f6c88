"""Third-party clients run against `trimode serve --api openai` as their users run them.

- lm-evaluation-harness (`make lm-eval-env`: its own virtual environment, since it needs numpy 2 and the
  project's nvidia-pytriton pins numpy < 2) runs the project's own local task (tests/data/lm_eval_task, no
  download) through `local-completions`: multiple-choice documents are loglikelihood requests (echo=True,
  logprobs=1, max_tokens=1), completion documents are generate_until requests. Each logged loglikelihood must
  equal transformers' on the same weights within 1e-3, its is_greedy flag must agree, and each generation must
  equal transformers' greedy continuation cut at the task's stop string. With lm-eval's default tokenizer
  (`auto`: the server's /tokenizer_info, /tokenize, /detokenize) it must score exactly the same.
- AIPerf (`make aiperf-env`) and GuideLLM (`make guidellm-env`) run a synthetic streamed load through
  benchmarks/serving_bench.py: no errors, and their token counts equal the server's counters in /metrics.

Each skips, naming the make target, when its environment is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .test_openai_server import start_server, stop_server

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "trimode" / "demo_model"
TASK_DIR = REPO / "tests" / "data" / "lm_eval_task"
LM_EVAL = REPO / ".venv-lm-eval" / "bin" / "lm_eval"
TOOLS = {"aiperf": REPO / ".venv-aiperf" / "bin" / "aiperf", "guidellm": REPO / ".venv-guidellm" / "bin" / "guidellm"}
EOS_ID = 11  # the demo model's config.json
TOLERANCE = 1e-3


def offline_env(home: Path) -> dict[str, str]:
    """The client's environment: Hugging Face libraries offline, caches in the test's own folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(home / "hf"),
               HF_DATASETS_CACHE=str(home / "hf" / "datasets"), TOKENIZERS_PARALLELISM="false",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory):
    """The demo model in the project's default mode (spec): greedy spec output equals AR's."""
    srv = start_server(DEMO, tmp_path_factory.mktemp("third_party") / "server.log", "--threads", "1",
                       "--default-mode", "spec")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def reference():
    """transformers' Ministral3ForCausalLM on the demo model's weights (fp32) and the same tokenizer file."""
    pytest.importorskip("transformers", minversion="5.0")
    from tokenizers import Tokenizer

    from trimode.runtime.bench.peers import transformers_model

    return transformers_model(DEMO, torch.float32), Tokenizer.from_file(str(DEMO / "tokenizer.json"))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair into tokens (TemplateLM._encode_pair, causal): trailing
    whitespace of the context moves to the continuation; the whole is encoded and the context's tokens cut off."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    ctx = tokenizer.encode(context, add_special_tokens=False).ids
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    ctx, cont = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    rows = logprobs[len(ctx) - 1: len(ctx) + len(cont) - 1]
    target = torch.tensor(cont)
    total = float(rows.gather(1, target[:, None]).sum())
    return total, bool(torch.equal(rows.argmax(-1), target))


@torch.inference_mode()
def reference_generation(model, tokenizer, context: str, max_new_tokens: int, until: list[str]) -> str:
    ids = torch.tensor([tokenizer.encode(context, add_special_tokens=False).ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    new = [t for t in out[0, ids.shape[1]:].tolist() if t != EOS_ID]
    text = tokenizer.decode(new)
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def read_samples(out: Path, task: str) -> list[dict]:
    files = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


def run_lm_eval(server, home: Path, model_args: list[str], tasks: str) -> Path:
    """`lm_eval --model local-completions` against the server, offline, with per-sample logs; its output folder."""
    if not LM_EVAL.exists():
        pytest.skip(f"lm-evaluation-harness's environment is absent ({LM_EVAL.parent.parent.name}/): "
                    "run `make lm-eval-env`")
    out = home / "out"
    args = ",".join([f"base_url={server.base}/v1/completions", f"model={server.model}", *model_args,
                     "num_concurrent=2", "max_retries=1", "timeout=120"])
    command = [str(LM_EVAL), "--model", "local-completions", "--model_args", args, "--include_path", str(TASK_DIR),
               "--tasks", tasks, "--log_samples", "--output_path", str(out), "--seed", "0"]
    run = subprocess.run(command, cwd=home, env=offline_env(home), capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL)
    log = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, f"lm_eval failed ({run.returncode}):\n{log}\n--- server:\n{server.log_tail()}"
    assert "API request failed" not in run.stdout + run.stderr, log
    return out


@pytest.fixture(scope="module")
def lm_eval_run(demo_server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both tasks, lm-eval tokenizing with the checkpoint's own tokenizer files (transformers, offline)."""
    return run_lm_eval(demo_server, tmp_path_factory.mktemp("lm_eval"),
                       [f"tokenizer={DEMO}", "tokenizer_backend=huggingface"], "trimode_code")


def test_lm_eval_loglikelihoods_equal_transformers(lm_eval_run: Path, reference) -> None:
    model, tokenizer = reference
    samples = read_samples(lm_eval_run, "trimode_code_choice")
    docs = [json.loads(line) for line in (TASK_DIR / "code_choice.jsonl").read_text().splitlines() if line]
    assert len(samples) == len(docs)
    worst = 0.0
    for sample in samples:
        doc = docs[sample["doc_id"]]
        assert len(sample["resps"]) == len(doc["choices"])
        for index, (args, resp) in enumerate(zip(sample["arguments"].values(), sample["resps"], strict=True)):
            assert (args["arg_0"], args["arg_1"]) == (doc["context"], doc["choices"][index])
            got, greedy = float(resp[0][0]), resp[0][1] in (True, "True")
            expected, expected_greedy = reference_loglikelihood(model, tokenizer, doc["context"],
                                                                doc["choices"][index])
            worst = max(worst, abs(got - expected))
            assert abs(got - expected) <= TOLERANCE, (sample["doc_id"], index, got, expected)
            assert greedy == expected_greedy, (sample["doc_id"], index)
    print(f"lm-eval loglikelihoods: {sum(len(s['resps']) for s in samples)} requests, "
          f"worst |lm-eval - transformers| = {worst:.2e}")


def test_lm_eval_generations_equal_transformers(lm_eval_run: Path, reference) -> None:
    model, tokenizer = reference
    samples = read_samples(lm_eval_run, "trimode_code_completion")
    docs = [json.loads(line) for line in (TASK_DIR / "code_completion.jsonl").read_text().splitlines() if line]
    assert len(samples) == len(docs)
    for sample in samples:
        doc = docs[sample["doc_id"]]
        kwargs = sample["arguments"]["gen_args_0"]["arg_1"]
        expected = reference_generation(model, tokenizer, doc["context"], kwargs["max_gen_toks"],
                                        kwargs["until"] + ["</s>"])
        assert sample["resps"][0][0] == expected, (sample["doc_id"], sample["resps"][0][0], expected)


def test_lm_eval_results_file(lm_eval_run: Path) -> None:
    files = sorted(lm_eval_run.rglob("results_*.json"))
    assert len(files) == 1, files
    results = json.loads(files[0].read_text())["results"]
    assert {"trimode_code_choice", "trimode_code_completion"} <= set(results)
    assert 0.0 <= results["trimode_code_choice"]["acc,none"] <= 1.0
    assert "exact_match,none" in results["trimode_code_completion"]


def test_lm_eval_remote_tokenizer(lm_eval_run: Path, demo_server, tmp_path: Path) -> None:
    """lm-eval's default `tokenizer_backend=auto` with no tokenizer named: it tokenizes through the server's
    /tokenizer_info, /tokenize and /detokenize (vLLM's), and scores exactly what the local tokenizer scored."""
    import httpx

    info = httpx.get(demo_server.base + "/tokenizer_info", timeout=10)
    assert info.status_code == 200 and info.json()["eos_token"], info.text
    out = run_lm_eval(demo_server, tmp_path, [], "trimode_code_choice")
    local = {s["doc_id"]: s["resps"] for s in read_samples(lm_eval_run, "trimode_code_choice")}
    for sample in read_samples(out, "trimode_code_choice"):
        for got, expected in zip(sample["resps"], local[sample["doc_id"]], strict=True):
            assert abs(float(got[0][0]) - float(expected[0][0])) <= 1e-5, (sample["doc_id"], got, expected)
            assert got[0][1] == expected[0][1], (sample["doc_id"], got, expected)


@pytest.mark.parametrize("tool", ["aiperf", "guidellm"])
def test_serving_benchmark_token_counts_equal_server_usage(tool: str, demo_server, tmp_path: Path) -> None:
    """benchmarks/serving_bench.py: 12 streamed requests of 24 prompt and 12 new tokens (ignore_eos), 3 at a time."""
    if not TOOLS[tool].exists():
        pytest.skip(f"{tool}'s environment is absent ({TOOLS[tool].parent.parent.name}/): run `make {tool}-env`")
    command = [sys.executable, str(REPO / "benchmarks" / "serving_bench.py"), "--tool", tool,
               "--base-url", demo_server.base, "--requests", "12", "--concurrency", "3", "--isl", "24",
               "--osl", "12", "--artifacts", str(tmp_path / tool)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode in (0, 1), f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    report = json.loads(run.stdout)
    expected_runs = {"aiperf": ["completions-usage", "chat-usage", "completions"],
                     "guidellm": ["guidellm-completions", "guidellm-chat"]}[tool]
    assert [r["name"] for r in report["runs"]] == expected_runs
    for run_report in report["runs"]:
        name, server = run_report["name"], run_report["server"]
        assert run_report["rc"] == 0, (name, run_report.get("log_tail"), demo_server.log_tail())
        client = run_report["client"]
        assert run_report["errors"] == 0, (name, run_report)
        assert run_report["requests"] == server["requests_finished"] == 12, (name, run_report)
        assert not [labels for labels in server["http_non_200"] if "/v1/" in labels], (name, run_report)
        assert server["generation_tokens"] == 12 * 12, (name, run_report)  # ignore_eos: exactly --osl each
        assert client["input_tokens"] == server["prompt_tokens"], (name, run_report)
        if run_report["server_token_count"]:  # the usage the tool read from the stream equals the counters
            assert client["output_tokens"] == server["generation_tokens"], (name, run_report)
    assert report["ok"] and run.returncode == 0, report
