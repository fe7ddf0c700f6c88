"""The Python API: load an engine (here the shipped demo model) once and generate, stream and chat.

    python examples/python_api.py [--model ENGINE_OR_CHECKPOINT]
"""

from __future__ import annotations

import argparse
import sys

from trimode import LLM, SamplingParams


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="engine or checkpoint directory (default: the demo model)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    with LLM(args.model, device="auto", threads=args.threads or None) as llm:
        prompts = ["    def close(self):", "import os\n\ndef"]
        # several prompts run together, one forward per step; each gets exactly its result alone
        for mode in ("ar", "spec"):
            for out in llm.generate(prompts, SamplingParams(max_tokens=48, mode=mode, stop=["\n\n"])):
                print(f"--- {mode}: {out.finish_reason}, {len(out.token_ids)} tokens in {out.forwards} forwards "
                      f"({out.tokens_per_forward:.2f} tokens/forward)")
                print(out.prompt + out.text)

        print("--- streamed, diffusion (blocks of 16):")
        sys.stdout.write(prompts[0])
        for piece in llm.stream(prompts[0], SamplingParams(max_tokens=48, mode="diffusion", block_length=16)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()

        print("--- chat (the model's chat template):")
        reply = llm.chat([{"role": "user", "content": "Write a close() method."}], SamplingParams(max_tokens=32))
        print(reply[0].text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
