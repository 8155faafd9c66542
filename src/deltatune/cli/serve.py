"""``deltatune serve``: one frozen base and a folder of deltas over HTTP (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import os

from ..core.quantized import FORMATS

ADMIN_TOKEN_ENV = "DELTATUNE_ADMIN_TOKEN"


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..serve import Settings, create_app, engine_from_options

    engine = engine_from_options(args.model, args.deltas, library=args.library, max_deltas=args.max_deltas, num_labels=args.num_labels,
                                 quantize=args.quantize)
    token = args.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None
    settings = Settings(admin_token=token, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                        queue_size=args.queue_size, timeout_s=args.timeout, max_inputs=args.max_inputs,
                        max_tokens=args.max_tokens)
    admin = "on" if token else f"off (pass --admin-token or set {ADMIN_TOKEN_ENV})"
    print(f"serving {args.model} ({engine.task}) with deltas from {args.deltas or args.library} on http://{args.host}:{args.port}; "
          f"admin endpoints {admin}")
    uvicorn.run(create_app(engine, settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_parsers(commands) -> None:
    serve = commands.add_parser("serve", help="serve one base model and many deltas over HTTP")
    serve.add_argument("--model", required=True, help="minilm, smollm2 or a local transformers folder")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--deltas", metavar="DIR", help="folder of delta folders (<DIR>/<name>/delta.json)")
    source.add_argument("--library", metavar="DB", help="a delta library (deltatune library add ...): serve its deltas")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--admin-token", default=None,
                       help=f"bearer token for loading/unloading deltas (or env {ADMIN_TOKEN_ENV}); without it they are off")
    serve.add_argument("--max-batch", type=_positive(int), default=32, help="most rows per model batch")
    serve.add_argument("--max-wait-ms", type=_positive(float), default=5.0, help="how long a batch waits for more requests")
    serve.add_argument("--queue-size", type=_positive(int), default=256, help="most waiting requests before 503")
    serve.add_argument("--timeout", type=_positive(float), default=30.0, help="seconds per request before 504")
    serve.add_argument("--max-deltas", type=_positive(int), default=16, help="deltas kept loaded (least recently used go)")
    serve.add_argument("--max-inputs", type=_positive(int), default=64, help="most texts or prompts per request")
    serve.add_argument("--max-tokens", type=_positive(int), default=256, help="largest max_tokens a completion may ask")
    serve.add_argument("--num-labels", type=_positive(int), default=None,
                       help="classifier outputs of the base (default: what the deltas' heads have)")
    serve.add_argument("--quantize", choices=FORMATS, default=None,
                       help="quantise the frozen base's Linear layers (int8, or 4bit NF4); deltas stay float32")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(run=_serve)
