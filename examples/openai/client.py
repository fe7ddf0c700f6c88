"""Talk to `trimode serve ENGINE --api openai` with the official openai client.

    trimode serve trimode/demo_model --api openai --http-port 8000 &
    python examples/openai/client.py --base-url http://127.0.0.1:8000/v1

Lists the served model, then runs a completion (whole and streamed) in each mode, a chat completion and a
request that the server refuses, printing what came back.
"""

from __future__ import annotations

import argparse
import sys

import openai


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--prompt", default="    def close(self):")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    print(f"model: {model}")

    for mode in ("ar", "diffusion", "spec"):
        done = client.completions.create(model=model, prompt=args.prompt, max_tokens=args.max_tokens,
                                         stop=["\n\n"], extra_body={"mode": mode, "block_length": 16})
        choice = done.choices[0]
        print(f"--- {mode}: finish_reason={choice.finish_reason}, {done.usage.completion_tokens} tokens")
        print(args.prompt + choice.text)

    print("--- streamed (spec):")
    sys.stdout.write(args.prompt)
    for chunk in client.completions.create(model=model, prompt=args.prompt, max_tokens=args.max_tokens,
                                           stream=True):
        sys.stdout.write(chunk.choices[0].text)
        sys.stdout.flush()
    print()

    print("--- chat:")
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write a function that closes a file."}],
        max_tokens=args.max_tokens, extra_body={"mode": "spec"})
    print(answer.choices[0].message.content)

    print("--- a request the server refuses:")
    try:
        client.completions.create(model=model, prompt="x", max_tokens=8, top_p=3.0)
    except openai.BadRequestError as exc:
        print(f"400: {exc.body['message'] if isinstance(exc.body, dict) else exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
