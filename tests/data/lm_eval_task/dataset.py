"""Loaders for the local lm-eval tasks (`custom_dataset: !function dataset.NAME` in the YAMLs beside this file).

lm-evaluation-harness imports this file from its own environment (`make lm-eval-env`); the rows are read from
the JSON Lines files beside it, so the task runs from any working directory and downloads nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rows(name: str) -> list[dict]:
    lines = (HERE / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _test_split(name: str):
    import datasets  # lm-eval's environment has it; the project's does not need it

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows(name))})


def code_choice(**_: object):
    """Multiple choice (loglikelihood requests): `context`, `choices`, `gold` (the index of the right one)."""
    return _test_split("code_choice.jsonl")


def code_completion(**_: object):
    """Generation (generate_until requests): `context`, `target`."""
    return _test_split("code_completion.jsonl")
