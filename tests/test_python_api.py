"""The Python API (`from trimode import LLM, SamplingParams`) against `generate()` on the same checkpoint."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import trimode
from trimode import LLM, SamplingParams
from trimode.runtime.generate import generate
from trimode.runtime.request import GenerationConfig, RequestError

from .test_chat_template import END_THINK, thinking_checkpoint

BLOCK = 8
PROMPTS = ["hello", "The quick brown fox", "zzz"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return thinking_checkpoint(tmp_path_factory.mktemp("api") / "ckpt")


@pytest.fixture(scope="module")
def llm(checkpoint: Path):
    with LLM(checkpoint, device="cpu", threads=1) as model:
        yield model


def expected(llm: LLM, prompt: list[int], **settings) -> list[int]:
    settings.setdefault("block_length", BLOCK)
    return generate(llm.engine, [prompt], GenerationConfig(**settings))[0].tokens


def test_exports() -> None:
    assert trimode.LLM is LLM and trimode.SamplingParams is SamplingParams
    with pytest.raises(AttributeError):
        trimode.NoSuchThing  # noqa: B018


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec", "quad", "infill"])
def test_generate_batch_equals_each_prompt_alone(llm: LLM, mode: str) -> None:
    suffix = " return x" if mode == "infill" else None
    params = SamplingParams(max_tokens=16, mode=mode, block_length=BLOCK, suffix=suffix)
    outputs = llm.generate(PROMPTS, params)
    assert [o.prompt for o in outputs] == PROMPTS
    suffix_ids = tuple(llm.tokenizer.encode(suffix, add_special_tokens=False).ids) if suffix else ()
    for out in outputs:
        want = expected(llm, out.prompt_token_ids, mode=mode, max_new_tokens=16, suffix=suffix_ids)
        assert out.token_ids == want
        assert out.text == llm.tokenizer.decode(want)
        assert out.finish_reason in ("stop", "length") and out.forwards >= 1
        assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt).ids


def test_token_id_prompts_and_sampling(llm: LLM) -> None:
    params = SamplingParams(max_tokens=12, mode="spec", block_length=BLOCK, temperature=0.9, top_p=0.8, top_k=30,
                            seed=3)
    one = llm.generate([5, 6, 7], params)
    assert len(one) == 1 and one[0].prompt_token_ids == [5, 6, 7]
    assert one[0].token_ids == expected(llm, [5, 6, 7], mode="spec", max_new_tokens=12, temperature=0.9, top_p=0.8,
                                        top_k=30, seed=3)
    assert llm.generate([[5, 6, 7]], params)[0].token_ids == one[0].token_ids  # reproducible


def test_stream_concatenates_to_generate(llm: LLM) -> None:
    for mode in ("ar", "diffusion", "spec"):
        params = SamplingParams(max_tokens=24, mode=mode, block_length=BLOCK)
        pieces = list(llm.stream("hello", params))
        assert "".join(pieces) == llm.generate("hello", params)[0].text
        assert len(pieces) >= 1


def test_stop_strings(llm: LLM) -> None:
    full = llm.generate("zzz", SamplingParams(max_tokens=32, mode="ar"))[0]
    stop = next(full.text[i:i + 2] for i in range(len(full.text) // 3, len(full.text) - 2)
                if full.text[i:i + 2].isprintable() and "\ufffd" not in full.text[i:i + 2]
                and full.text.find(full.text[i:i + 2]) > 0)
    cut = llm.generate("zzz", SamplingParams(max_tokens=32, mode="ar", stop=[stop]))[0]
    assert cut.text == full.text[:full.text.find(stop)]
    assert cut.finish_reason == "stop" and cut.stop_string == stop
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]
    assert stop in llm.tokenizer.decode(cut.token_ids) and stop not in llm.tokenizer.decode(cut.token_ids[:-1])
    assert "".join(llm.stream("zzz", SamplingParams(max_tokens=32, mode="ar", stop=stop))) == cut.text


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec", "quad"])
def test_chat_and_thinking_budget(llm: LLM, mode: str) -> None:
    messages = [{"role": "user", "content": "think"}]
    params = SamplingParams(max_tokens=16, mode=mode, block_length=BLOCK, max_thinking_tokens=5)
    out = llm.chat(messages, params)[0]
    assert out.prompt.endswith("<|im_start|>assistant\n<think>")
    assert END_THINK in out.token_ids[:5] or out.token_ids[5] == END_THINK
    assert out.token_ids == expected(llm, llm.tokenizer.encode(out.prompt, add_special_tokens=False).ids, mode=mode,
                                     max_new_tokens=16, max_thinking_tokens=5, end_think_token_id=END_THINK)
    off = llm.chat(messages, SamplingParams(max_tokens=4, mode=mode, block_length=4, enable_thinking=False))[0]
    assert off.prompt.endswith("<think></think>")
    assert "".join(llm.stream_chat(messages, params)) == out.text


def test_bad_requests_raise_before_running(llm: LLM) -> None:
    with pytest.raises(RequestError, match="unknown mode"):
        llm.generate("hi", SamplingParams(mode="nope"))
    with pytest.raises(RequestError, match="multiple of"):
        llm.generate("hi", SamplingParams(mode="diffusion", max_tokens=5, block_length=4))
    with pytest.raises(RequestError, match="maximum sequence length|positions"):
        llm.generate("hi", SamplingParams(mode="ar", max_tokens=10**6))
    with pytest.raises(RequestError):  # a bad prompt in a batch: nothing of the batch runs
        llm.generate(["hi", [999999]], SamplingParams(mode="ar"))


def test_closing_a_stream_early_cancels_it(llm: LLM) -> None:
    stream = llm.stream("hello", SamplingParams(max_tokens=3000, mode="ar"))
    next(stream)
    stream.close()
    done = threading.Event()
    result = []

    def run() -> None:
        result.append(llm.generate("hi", SamplingParams(max_tokens=4, mode="ar")))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(60)
    assert len(result[0][0].token_ids) == 4


def test_thinking_budget_needs_the_token(tmp_path: Path) -> None:
    from .conftest import build_checkpoint

    with LLM(build_checkpoint(tmp_path / "plain"), device="cpu") as plain:
        with pytest.raises(RequestError, match="</think>"):
            plain.generate("hi", SamplingParams(max_thinking_tokens=3, mode="ar"))
        with pytest.raises(RequestError, match="chat template"):
            plain.chat([{"role": "user", "content": "hi"}])


def test_the_program_exits_cleanly_without_close(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The README's first snippet (no `with`, no close()) on an engine exits 0, and the engine loop's thread is
    stopped before the interpreter finalizes: a thread torn down inside torch at exit aborted the process
    ("terminate called without an active exception", status 134; 1 in 12 runs under load on the demo
    engine). A hook registered before trimode is imported runs after trimode's own exit hook and reports
    whether the loop's thread is still alive at that point - deterministic, unlike the abort itself."""
    import subprocess
    import sys

    from trimode.builder.engine_build import BuildOptions, build_engine

    engine = tmp_path / "engine"
    build_engine(tiny_checkpoint, engine, BuildOptions(max_batch_size=4, max_seq_len=128))
    script = ("import atexit, threading\n"
              "atexit.register(lambda: print('loop ' + ('alive' if any(t.name == 'trimode-engine-loop' and "
              "t.is_alive() for t in threading.enumerate()) else 'stopped')))\n"
              "from trimode import LLM, SamplingParams\n"
              f"llm = LLM({str(engine)!r})\n"
              "print(llm.generate([1, 5, 6], SamplingParams(max_tokens=8, mode='spec'))[0].token_ids)\n")
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(4)]
    for run in runs:
        out, err = run.communicate(timeout=180)
        assert run.returncode == 0, err[-500:]
        assert "terminate called" not in err and out.strip().startswith("[")
        assert out.strip().splitlines()[-1] == "loop stopped"
