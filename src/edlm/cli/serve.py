"""`edlm serve`: an OpenAI-compatible HTTP server for a converted model (needs the `serve` extra)."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from edlm.cli.common import add_compile_flag, add_dtype_flag, dtype_flag
from edlm.errors import EdlmError


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server: completions, chat, embeddings",
                       description="Serve MODEL (a converted edlm dir) at http://HOST:PORT/v1 with batched "
                       "block-parallel decoding. Example: edlm serve models/dlm --port 8000, then "
                       "OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='x').completions.create(...)")
    p.add_argument("model", help="converted edlm model directory (--ar: a plain AR directory)")
    p.add_argument("--ar", action="store_true", help="MODEL is a plain AR checkpoint, served through the same "
                   "engine (block size 1 baseline)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model ids clients pass as `model` (the first is listed by /v1/models; default: MODEL "
                   "as given, and its directory name)")
    p.add_argument("--verifier", default=None, help="AR_DIR: MODEL drafts, this AR parent verifies (answers are "
                   "the parent's greedy text; decode options in requests other than block_size are refused)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--max-batch", type=int, default=64, help="most rows decoded together in one call")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    p.add_argument("--api-key", default=None,  # read from the environment in run(): never shown by --help
                   help="clients must send 'Authorization: Bearer KEY' to /v1 and /metrics, else 401 "
                   "(default: $EDLM_API_KEY; none: open)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve beyond loopback (--host 0.0.0.0, ...) without --api-key, which is refused otherwise")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20,
                   help="largest request body in bytes, else 413 (default: 4194304 = 4 MiB)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send its whole request body, else 408 (default 30)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="a vision-language model: fetch chat images given as http(s) URLs (each bounded in size and "
                   "time); without it only inline data URLs are read. The server then fetches any URL a client "
                   "names, from where it runs: keep it off where clients are not trusted")
    add_dtype_flag(p)
    add_compile_flag(p)
    p.set_defaults(func=run)


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise EdlmError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another with --port") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def run(args) -> None:
    if not 0 < args.port < 65536:
        raise EdlmError(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch < 1:
        raise EdlmError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_queue < 1:
        raise EdlmError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.max_request_bytes < 1:
        raise EdlmError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    if not args.body_timeout > 0:
        raise EdlmError(f"--body-timeout must be > 0 seconds, got {args.body_timeout}")
    if args.ar and args.verifier:
        raise EdlmError("--verifier drafts with MODEL, a converted dLM: drop --ar")
    args.api_key = args.api_key or os.environ.get("EDLM_API_KEY") or None
    if not args.api_key and not _is_loopback(args.host):
        if not args.allow_unauthenticated:
            raise EdlmError(f"--host {args.host} lets other machines in, and there is no --api-key (or "
                            "EDLM_API_KEY): set one, or pass --allow-unauthenticated")
        print(f"WARNING: serving on {args.host} WITHOUT AUTHENTICATION: anyone who can reach this port can use "
              "the model (set --api-key to stop that)", file=sys.stderr)
    try:
        import uvicorn

        from edlm.serve.app import create_app
    except ImportError as exc:
        raise EdlmError(f"edlm serve needs the serve extra ({exc.name} is missing): "
                        "pip install 'edlm[serve]'") from None
    from edlm.model import DiffusionLM

    _check_port_free(args.host, args.port)
    dlm = DiffusionLM.from_pretrained(args.model, dtype=dtype_flag(args), autoregressive=args.ar,
                                      compile=args.compile)
    names = args.served_model_name or [args.model, Path(args.model).name]
    verifier = (DiffusionLM.from_pretrained(args.verifier, autoregressive=True, dtype=dtype_flag(args),
                                            compile=args.compile)
                if args.verifier else None)
    app = create_app(dlm, names[0], max_batch=args.max_batch, max_queue=args.max_queue, aliases=names[1:],
                     verifier=verifier, api_key=args.api_key, max_request_bytes=args.max_request_bytes,
                     body_timeout=args.body_timeout, allow_remote_images=args.allow_remote_images)
    print(f"serving {args.model} at http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if args.api_key else ''}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
