"""``visalign serve --scorer ID[,ID...]``: registered scorers behind an HTTP reward server (docs/serving.md)."""

from __future__ import annotations

import argparse
import os
import sys

EPILOG = """examples:
  visalign serve --scorer brightness                       # http://127.0.0.1:8100, GET /health, POST /v1/score
  visalign serve --scorer clip-vit-b32,pickscore --device cuda --dtype bfloat16 --token-env VISALIGN_TOKEN
  # a recipe then scores with {scorer: remote-served, params: ...} (docs/serving.md#client)
"""

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="Serve scorers over HTTP (batched; PNG or safetensors bodies, never pickle).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="A reward server: POST /v1/score, GET /health (schema: docs/serving.md).")
    p.add_argument("--scorer", required=True, help="Scorer id(s) to serve, comma-separated.")
    p.add_argument("--host", default="127.0.0.1", help="Bind address (default loopback; 0.0.0.0 exposes it).")
    p.add_argument("--port", type=int, default=8100, help="TCP port (0 = any free port, printed at start).")
    p.add_argument("--device", default="cpu", help="Device of the scorers (cpu, cuda, cuda:1).")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="Compute dtype of the scorers.")
    p.add_argument("--token-env", help="Environment variable holding the bearer token requests must carry.")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="Refuse bodies larger than this (413).")
    p.add_argument("--max-batch", type=int, default=64, help="Samples per scored batch.")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="How long the first request of a batch waits for others to join it.")


def run(args: argparse.Namespace) -> int:
    import torch

    from visalign.scorers import get_scorer
    from visalign.serving.server import RewardServer, ServeConfig

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            print(f"visalign serve: --token-env {args.token_env} names an unset or empty environment variable.",
                  file=sys.stderr)
            return 2
    ids = [s.strip() for s in args.scorer.split(",") if s.strip()]
    try:
        scorers = {i: get_scorer(i, device=args.device, dtype=getattr(torch, args.dtype)) for i in ids}
        for scorer in scorers.values():
            scorer.ensure_loaded()  # load weights now: the first request should not wait for them
        server = RewardServer(scorers, ServeConfig(host=args.host, port=args.port, token=token,
                                                   max_body_bytes=int(args.max_body_mb * (1 << 20)),
                                                   max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1000))
    except (ValueError, OSError) as err:
        print(f"visalign serve: {err}", file=sys.stderr)
        return 2
    print(f"serving {sorted(scorers)} on {server.url} (POST /v1/score, GET /health); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
