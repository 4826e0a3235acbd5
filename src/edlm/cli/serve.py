"""`edlm serve`: an OpenAI-compatible HTTP server for a converted model (needs the `serve` extra)."""

from __future__ import annotations

import sys
from pathlib import Path

from edlm.cli.common import add_dtype_flag, dtype_flag
from edlm.errors import EdlmError


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server: completions, chat, embeddings",
                       description="Serve MODEL (a converted edlm dir) at http://HOST:PORT/v1 with batched "
                       "block-parallel decoding. Example: edlm serve models/dlm --port 8000, then "
                       "OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='x').completions.create(...)")
    p.add_argument("model", help="converted edlm model directory")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model ids clients pass as `model` (the first is listed by /v1/models; default: MODEL "
                   "as given, and its directory name)")
    p.add_argument("--verifier", default=None, help="AR_DIR: MODEL drafts, this AR parent verifies (answers are "
                   "the parent's greedy text; decode options in requests other than block_size are refused)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=64, help="most rows decoded together in one call")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    add_dtype_flag(p)
    p.set_defaults(func=run)


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise EdlmError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another with --port") from None


def run(args) -> None:
    if not 0 < args.port < 65536:
        raise EdlmError(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch < 1:
        raise EdlmError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_queue < 1:
        raise EdlmError(f"--max-queue must be >= 1, got {args.max_queue}")
    try:
        import uvicorn

        from edlm.serve.app import create_app
    except ImportError as exc:
        raise EdlmError(f"edlm serve needs the serve extra ({exc.name} is missing): "
                        "pip install 'edlm[serve]'") from None
    from edlm.model import DiffusionLM

    _check_port_free(args.host, args.port)
    dlm = DiffusionLM.from_pretrained(args.model, dtype=dtype_flag(args))
    names = args.served_model_name or [args.model, Path(args.model).name]
    verifier = (DiffusionLM.from_pretrained(args.verifier, autoregressive=True, dtype=dtype_flag(args))
                if args.verifier else None)
    app = create_app(dlm, names[0], max_batch=args.max_batch, max_queue=args.max_queue, aliases=names[1:],
                     verifier=verifier)
    print(f"serving {args.model} at http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
