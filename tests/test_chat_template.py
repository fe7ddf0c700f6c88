"""Chat templates render exactly as transformers' `apply_chat_template` renders them (same template, same
messages, same options), the template is found where checkpoints keep it, and `trimode generate --chat` and the
Python API use the same prompt tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trimode.demo import DEMO_MODEL_DIR
from trimode.runtime.serving.chat_template import ChatTemplate, ChatTemplateError, chat_prompt_ids

from .conftest import build_checkpoint

# A template in the style of the instruct models: system prompt, tojson, raise_exception, bos_token, thinking.
RICH = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set messages = messages[1:] -%}{%- else -%}{%- set system = 'You are helpful.' -%}{%- endif -%}"
    "<|im_start|>system\n{{ system }}<|im_end|>\n"
    "{%- for message in messages %}\n"
    "  {%- if message['role'] not in ['user', 'assistant'] -%}"
    "{{ raise_exception('unsupported role ' + message['role']) }}{%- endif %}\n"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{%- if loop.last and message['role'] == 'user' and meta is defined %}{{ meta | tojson }}{% endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and not enable_thinking %}<think></think>{% else %}<think>\n{% endif %}"
    "{%- endif %}")

THINKING_TEMPLATE = (
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think></think>' -}}"
    "{%- else -%}{{- '<think>' -}}{%- endif -%}{%- endif -%}")


def thinking_checkpoint(root: Path) -> Path:
    """A tiny checkpoint whose tokenizer has <think> and </think> (its last two ids) and a chat template."""
    path = build_checkpoint(root, vocab_size=260)
    data = json.loads((path / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    by_id = {i: token for token, i in vocab.items()}
    for token_id, text in ((258, "<think>"), (259, "</think>")):
        del vocab[by_id[token_id]]
        vocab[text] = token_id
        data["added_tokens"].append({"id": token_id, "content": text, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": False})
    (path / "tokenizer.json").write_text(json.dumps(data))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "chat_template": THINKING_TEMPLATE}))
    return path


END_THINK = 259

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 2+2?  "},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3 — ünïcode?"}],
]


def transformers_tokenizer(directory: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))


def write_model_dir(root: Path, template: str | list, **config) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEMO_MODEL_DIR / "tokenizer.json", root / "tokenizer.json")
    (root / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "chat_template": template, **config}))
    return root


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("options", [{}, {"enable_thinking": True}, {"enable_thinking": False},
                                     {"add_generation_prompt": False}])
def test_demo_template_matches_transformers(messages: list[dict], options: dict) -> None:
    ours = ChatTemplate.from_dir(DEMO_MODEL_DIR)
    assert ours is not None
    theirs = transformers_tokenizer(DEMO_MODEL_DIR)
    add = options.get("add_generation_prompt", True)
    extra = {k: v for k, v in options.items() if k != "add_generation_prompt"}
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add, **extra)
    assert ours.render(messages, add_generation_prompt=add, **extra) == expected


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("thinking", [None, True, False])
def test_rich_template_matches_transformers_text_and_tokens(tmp_path: Path, messages: list[dict],
                                                            thinking: bool | None) -> None:
    directory = write_model_dir(tmp_path / "model", RICH)
    ours = ChatTemplate.from_dir(directory)
    theirs = transformers_tokenizer(directory)
    extra = {} if thinking is None else {"enable_thinking": thinking}
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, meta={"ü": [1]},
                                          **extra)
    assert ours.render(messages, add_generation_prompt=True, meta={"ü": [1]}, **extra) == expected
    assert expected.startswith("<s><|im_start|>system") and '{"ü": [1]}' in expected
    # tokens: transformers tokenizes the rendered text without adding special tokens again
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **extra)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert chat_prompt_ids(ours, tokenizer, messages, thinking) == list(ids)


def test_raise_exception_and_broken_templates(tmp_path: Path) -> None:
    ours = ChatTemplate.from_dir(write_model_dir(tmp_path / "a", RICH))
    with pytest.raises(ChatTemplateError, match="unsupported role tool"):
        ours.render([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")
    with pytest.raises(ChatTemplateError, match="failed"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render([{"role": "user", "content": "x"}])


def test_template_sources(tmp_path: Path) -> None:
    named = write_model_dir(tmp_path / "named", [{"name": "tool_use", "template": "TOOLS"},
                                                 {"name": "default", "template": "DEFAULT"}])
    assert ChatTemplate.from_dir(named).render([]) == "DEFAULT"
    jinja = write_model_dir(tmp_path / "jinja", "FROM CONFIG")
    (jinja / "chat_template.jinja").write_text("FROM FILE {{ eos_token }}")
    assert ChatTemplate.from_dir(jinja).render([]) == "FROM FILE </s>"
    bare = tmp_path / "bare"
    bare.mkdir()
    assert ChatTemplate.from_dir(bare) is None
    token_dicts = write_model_dir(tmp_path / "dicts", "{{ bos_token }}|{{ eos_token }}",
                                  bos_token={"content": "<B>", "lstrip": False})
    assert ChatTemplate.from_dir(token_dicts).render([]) == "<B>|</s>"


def test_sandbox_refuses_attribute_tricks() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        template.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% set x = messages.append(1) %}").render([])


def test_cli_generate_chat_uses_the_same_prompt(tmp_path: Path) -> None:
    """`trimode generate --chat` and the Python API's chat() send the same tokens (so: the same output)."""
    from click.testing import CliRunner

    from trimode.cli import cli
    from trimode.runtime.backends.engine_loader import open_engine
    from trimode.runtime.generate import generate
    from trimode.runtime.request import GenerationConfig

    runner = CliRunner()
    args = ["generate", "--chat", "--system", "Be brief.", "--prompt", "hi", "--max-new-tokens", "8", "--mode", "ar",
            "--device", "cpu", "--json"]
    done = runner.invoke(cli, args)
    assert done.exit_code == 0, done.output
    got = json.loads(done.output.strip().splitlines()[-1])["outputs"][0]["tokens"]
    engine = open_engine(DEMO_MODEL_DIR, device="cpu")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(DEMO_MODEL_DIR / "tokenizer.json"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    prompt = chat_prompt_ids(ChatTemplate.from_dir(DEMO_MODEL_DIR), tokenizer, messages)
    assert tokenizer.decode(prompt) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
        "<|im_start|>assistant\n"
    expected = generate(engine, [prompt], GenerationConfig(mode="ar", max_new_tokens=8,
                                                           block_length=engine.config.block_size))[0].tokens
    assert got == expected
    refused = runner.invoke(cli, ["generate", "--chat", "--prompt-ids", "1,2", "--device", "cpu"])
    assert refused.exit_code != 0
