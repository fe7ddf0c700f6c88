"""Talk to `trimode serve`: HTTP generate endpoint, tritonclient HTTP infer, and gRPC streaming.

    python examples/triton/client.py --prompt "Hello" --mode spec              # all three ways
    python examples/triton/client.py --input-ids 1,5,6,7 --mode diffusion --max-tokens 32 --block-length 8
    python examples/triton/client.py --prompt "Hello" --only grpc               # only the token stream

`trimode` is the decoupled model (streams tokens as they are committed; gRPC streams and the HTTP
generate / generate_stream endpoints). `trimode_sync` exists when the server was started with --sync-model
and answers plain `infer` calls, which Triton refuses for decoupled models.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
import urllib.error
import urllib.request

import numpy as np


def request_values(args: argparse.Namespace) -> dict:
    values: dict = {"max_tokens": args.max_tokens, "mode": args.mode}
    if args.input_ids:
        values["input_ids"] = [int(t) for t in args.input_ids.split(",")]
    else:
        values["text_input"] = args.prompt
    if args.block_length:
        values["block_length"] = args.block_length
    if args.threshold is not None:
        values["threshold"] = args.threshold
    return values


def http_generate(args: argparse.Namespace) -> None:
    """Triton's generate extension: JSON in, JSON out, nothing but the standard library."""
    body = json.dumps(request_values(args)).encode()
    request = urllib.request.Request(f"http://{args.http}/v2/models/{args.model}/generate", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as reply:
            result = json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        print(f"[http generate] error {exc.code}: {json.loads(exc.read()).get('error')}")
        return
    print(f"[http generate] {result['text_output']!r} ({result['forwards']} forwards, {result['finish_reason']})")


def infer_inputs(module, values: dict) -> list:
    """tritonclient InferInputs with the dtypes config.pbtxt declares."""
    inputs = []
    for name, value in values.items():
        if name in ("text_input", "mode"):
            array = np.array([value.encode()], dtype=np.object_)
        elif name == "input_ids":
            array = np.asarray(value, dtype=np.int32)
        elif name in ("threshold", "temperature"):
            array = np.asarray([value], dtype=np.float32)
        elif name == "stream":
            array = np.asarray([value], dtype=np.bool_)
        else:
            array = np.asarray([value], dtype=np.int32)
        kind = {np.object_: "BYTES", np.int32: "INT32", np.float32: "FP32", np.bool_: "BOOL"}[array.dtype.type]
        item = module.InferInput(name, list(array.shape), kind)
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


def http_infer(args: argparse.Namespace) -> None:
    """tritonclient's HTTP client against the non-decoupled twin (`--sync-model`)."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(args.http)
    try:
        result = client.infer(args.model + "_sync", infer_inputs(httpclient, request_values(args)))
        print(f"[http infer] {result.as_numpy('text_output')[0].decode()!r} ids "
              f"{result.as_numpy('output_ids').tolist()}")
    except InferenceServerException as exc:
        print(f"[http infer] {exc.message()} (was the server started with --sync-model?)")
    finally:
        client.close()


def grpc_stream(args: argparse.Namespace) -> None:
    """tritonclient's gRPC stream: one response per commit, then a FINAL one with forwards and finish reason."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(args.grpc)
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    start = time.perf_counter()
    try:
        client.async_stream_infer(args.model, infer_inputs(grpcclient, {**request_values(args), "stream": True}))
        sys.stdout.write("[grpc stream] ")
        while True:
            result, error = replies.get(timeout=args.timeout)
            if error is not None:
                print(f"\n[grpc stream] error: {error.message()}")
                return
            text = result.as_numpy("text_output")
            sys.stdout.write(text[0].decode() if text is not None else str(result.as_numpy("output_ids").tolist()))
            sys.stdout.flush()
            if result.get_response().parameters["triton_final_response"].bool_param:
                forwards = int(result.as_numpy("forwards")[0])
                print(f"\n[grpc stream] {forwards} forwards, {result.as_numpy('finish_reason')[0].decode()}, "
                      f"{time.perf_counter() - start:.2f}s")
                return
    finally:
        client.stop_stream()
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http", default="127.0.0.1:8000", help="HTTP address of the server")
    parser.add_argument("--grpc", default="127.0.0.1:8001", help="gRPC address of the server")
    parser.add_argument("--model", default="trimode")
    parser.add_argument("--prompt", default="Hello")
    parser.add_argument("--input-ids", default=None, help="comma-separated token ids instead of --prompt")
    parser.add_argument("--mode", choices=["ar", "diffusion", "spec"], default="spec")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--only", choices=["http", "infer", "grpc"], default=None)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    ways = {"http": http_generate, "infer": http_infer, "grpc": grpc_stream}
    for name, way in ways.items():
        if args.only in (None, name):
            way(args)


if __name__ == "__main__":
    main()
