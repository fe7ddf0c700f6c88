"""Write prompts.json: code prompts from held-out stdlib files (a def line and the lines after it).

    python examples/train_demo/make_prompts.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import corpus_files, read_text  # noqa: E402

LINES = 4
COUNT = 16


def prompts_from(path: Path) -> list[str]:
    lines = read_text(path).splitlines()
    found = []
    for number, line in enumerate(lines):
        if line.startswith(("def ", "    def ")) and not line.lstrip().startswith("def _"):
            found.append("\n".join(lines[number : number + LINES]) + "\n")
    return found


def main() -> None:
    _, held = corpus_files()
    prompts: list[dict] = []
    for path in held:
        for text in prompts_from(path)[:2]:
            prompts.append({"file": path.name, "prompt": text})
    out = Path(__file__).resolve().parent / "prompts.json"
    out.write_text(json.dumps(prompts[:COUNT], indent=2) + "\n")
    print(f"wrote {min(len(prompts), COUNT)} prompts to {out}")


if __name__ == "__main__":
    main()
