"""The Triton pieces that need no server: repository files, request parsing, text deltas.

The server itself is tested in test_triton_server.py (integration); these run in `make test`.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer

from trimode.builder.errors import CheckpointError
from trimode.runtime.backends.checkpoint_engine import engine_from_checkpoint
from trimode.runtime.request import GenerationConfig, RequestError
from trimode.runtime.serving.text import TextAssembler
from trimode.runtime.serving.triton.repo import ServingSettings, write_triton_repo
from trimode.runtime.serving.triton.request import parse_request


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return engine_from_checkpoint(tiny_checkpoint, max_batch_size=4)


# -- repository ---------------------------------------------------------------------------------------------


def test_repo_layout_and_parameters(tiny_checkpoint, tmp_path):
    written = write_triton_repo(tiny_checkpoint, tmp_path / "repo", sync_model=True, max_step_tokens=96,
                                default_mode="ar", instance_count=2)
    assert [p.name for p in written] == ["trimode", "trimode_sync"]
    config = (tmp_path / "repo" / "trimode" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "decoupled: true" in config and "count: 2" in config
    assert "decoupled: false" in (tmp_path / "repo" / "trimode_sync" / "config.pbtxt").read_text()
    for name in ("text_input", "input_ids", "max_tokens", "mode", "block_length", "threshold", "temperature",
                 "seed", "stream", "text_output", "output_ids", "forwards"):
        assert f'name: "{name}"' in config
    shim = (tmp_path / "repo" / "trimode" / "1" / "model.py").read_text()
    assert "from trimode.runtime.serving.triton.model import TritonPythonModel" in shim
    compile(shim, "model.py", "exec")


def test_settings_round_trip_through_parameters(tmp_path):
    settings = ServingSettings(engine_path="/a/b \"c\"", use_lora=False, max_step_tokens=64, max_batch_size=3)
    assert ServingSettings.from_parameters(settings.to_parameters()) == settings
    with pytest.raises(ValueError, match="engine_path"):
        ServingSettings.from_parameters({"dtype": "fp32"})
    with pytest.raises(ValueError, match="max_batch_size"):
        ServingSettings.from_parameters({"engine_path": "/x", "max_batch_size": "many"})


def test_repo_refuses_overwrite_and_bad_engines(tiny_checkpoint, tmp_path):
    write_triton_repo(tiny_checkpoint, tmp_path / "repo")
    with pytest.raises(FileExistsError, match="--force"):
        write_triton_repo(tiny_checkpoint, tmp_path / "repo")
    write_triton_repo(tiny_checkpoint, tmp_path / "repo", force=True)
    with pytest.raises(CheckpointError, match="neither an engine"):
        write_triton_repo(tmp_path, tmp_path / "repo2")


def test_triton_repo_command(tiny_checkpoint, tmp_path):
    run = [sys.executable, "-m", "trimode", "triton-repo", str(tiny_checkpoint), "-o", str(tmp_path / "r"),
           "--model-name", "tm", "--max-step-tokens", "48"]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert '{ key: "max_step_tokens" value: { string_value: "48" } }' in (tmp_path / "r/tm/config.pbtxt").read_text()
    again = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


# -- request parsing ----------------------------------------------------------------------------------------


def ids(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def one(value, dtype) -> np.ndarray:
    return np.asarray([value], dtype=dtype)


def test_parse_defaults_and_values(engine):
    parsed = parse_request({"input_ids": ids(1, 2)}, engine, default_mode="ar", default_max_tokens=9)
    assert parsed.request.prompt == (1, 2) and not parsed.stream
    assert parsed.request.config == GenerationConfig(mode="ar", max_new_tokens=9,
                                                     block_length=engine.config.block_size)
    parsed = parse_request({"input_ids": ids(3), "mode": one(b"Diffusion", object), "max_tokens": one(16, np.int32),
                            "block_length": one(4, np.int32), "threshold": one(0.5, np.float32),
                            "temperature": one(0.7, np.float32), "seed": one(5, np.int64),
                            "stream": one(True, bool)}, engine)
    assert parsed.stream and parsed.request.config.mode == "diffusion" and parsed.request.config.block_length == 4
    assert parsed.request.config.threshold == pytest.approx(0.5) and parsed.request.config.seed == 5


def test_parse_text_needs_and_uses_the_tokenizer(engine):
    with pytest.raises(RequestError, match="needs a tokenizer"):
        parse_request({"text_input": one(b"hi", object)}, engine)
    tokenizer = Tokenizer.from_file(str(engine.tokenizer_path))
    parsed = parse_request({"text_input": one(b"hi", object)}, engine, encode=lambda t: tokenizer.encode(t).ids)
    assert list(parsed.request.prompt) == tokenizer.encode("hi").ids


@pytest.mark.parametrize("inputs,message", [
    ({}, "missing input"),
    ({"input_ids": ids(1), "text_input": one(b"x", object)}, "not both"),
    ({"input_ids": np.asarray([1.0, 2.0])}, "INT32 token ids"),
    ({"input_ids": np.asarray([[1, 2]], dtype=np.int32)}, "one-dimensional"),
    ({"input_ids": ids(1), "mode": one(b"beam", object)}, "unknown mode 'beam'"),
    ({"input_ids": ids(1), "mode": one(7, np.int32)}, "must be BYTES"),
    ({"input_ids": ids(1), "max_tokens": np.asarray([1, 2], dtype=np.int32)}, "exactly one value"),
    ({"input_ids": ids(1), "max_tokens": one(1.5, np.float32)}, "must be an integer"),
    ({"input_ids": ids(1), "max_tokens": one(0, np.int32)}, "max_tokens must be positive"),
    ({"input_ids": ids(1), "temperature": one(np.nan, np.float32)}, "must be finite"),
    ({"input_ids": ids(1), "stream": one(1, np.int32)}, "must be BOOL"),
    ({"input_ids": ids(1, 300)}, "outside the vocabulary"),
    ({"input_ids": ids(1), "max_tokens": one(5000, np.int32)}, "maximum sequence length"),
    ({"text_input": one(b"\xff\xfe", object)}, "not valid UTF-8"),
])
def test_parse_errors(engine, inputs, message):
    with pytest.raises(RequestError, match=message):
        parse_request(inputs, engine, encode=lambda t: [1])


def test_stream_refused_without_decoupling(engine):
    with pytest.raises(RequestError, match="decoupled"):
        parse_request({"input_ids": ids(1), "stream": one(True, bool)}, engine, allow_stream=False)


# -- text deltas --------------------------------------------------------------------------------------------


def test_text_deltas_concatenate_to_the_whole_text(engine):
    tokenizer = Tokenizer.from_file(str(engine.tokenizer_path))
    rng = np.random.default_rng(0)
    for _ in range(20):
        tokens = [int(t) for t in rng.integers(0, 256, size=40)]
        text = TextAssembler(tokenizer.decode)
        pieces, at = [], 0
        while at < len(tokens):
            step = int(rng.integers(1, 5))
            pieces.append(text.add_many(tokens[at : at + step]))
            at += step
        pieces.append(text.finish(tokens))
        assert "".join(pieces) == tokenizer.decode(tokens)
        assert all("\ufffd" not in p[-1:] for p in pieces[:-1])


# -- server launcher (no server started) --------------------------------------------------------------------


def test_log_tail_names_the_model_load_failure(tmp_path):
    from trimode.runtime.serving.triton.server import TritonServer

    log = tmp_path / "tritonserver.log"
    log.write_text('I1126 server.cc:1] "starting"\n'
                   'E1126 model_lifecycle.cc:642] "failed to load \'trimode\' version 1: Internal: CheckpointError: '
                   '/e/manifest.json: not a trimode engine manifest (expected \\"format\\")\\n\\nAt:\\n  x.py(1)"\n'
                   "error: creating server: Internal - failed to load all models\n")
    tail = TritonServer(tmp_path, log_path=log).log_tail()
    assert tail == ("failed to load 'trimode' version 1: Internal: CheckpointError: /e/manifest.json: not a trimode "
                    'engine manifest (expected "format")')


def test_server_environment_puts_this_pythons_libdir_first():
    import sysconfig

    from trimode.runtime.serving.triton.server import TritonInstall, server_environment

    env = server_environment(TritonInstall(binary=sys.executable, backend_dir=None, lib_dirs=()))
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        assert env["LD_LIBRARY_PATH"].split(":")[0] == libdir
