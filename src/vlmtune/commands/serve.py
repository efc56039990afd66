"""``vlmtune serve --checkpoint DIR``: an OpenAI-compatible chat completions API over a checkpoint.

Load the checkpoint as ``predict`` does, wrap it in an engine and a batcher, and run the FastAPI app on uvicorn.
The server binds to 127.0.0.1 unless told otherwise; ``--api-key`` (or ``VLMTUNE_API_KEY``) is checked on every
request. ``start`` runs the same server in a background thread of the calling process (tests, the load benchmark).
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vlmtune.commands.loading import CheckpointError, load_checkpoint, resolve_checkpoint, with_overrides
from vlmtune.commands.predict import device
from vlmtune.serve.app import ServeOptions, create_app
from vlmtune.serve.batcher import Batcher
from vlmtune.serve.engine import Engine
from vlmtune.tracking import echo

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The serve command's flags."""
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint folder (final/, checkpoint-N/), a run folder, or a plain transformers model folder",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="let the model folder's own Python code run")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("VLMTUNE_API_KEY"),
        help="key every request must send as 'Authorization: Bearer KEY' (default: $VLMTUNE_API_KEY; none: no check)",
    )
    p.add_argument("--model-name", help="the model id clients name (default: the run or checkpoint folder's name)")
    p.add_argument(
        "--allow-local-files",
        metavar="DIR",
        help="also read image_url paths (or file:// URLs) of files inside DIR; without it only data: URIs are read",
    )
    p.add_argument("--max-batch", type=int, default=8, help="most requests one generate call answers (default 8)")
    p.add_argument(
        "--batch-wait-ms", type=float, default=10.0, help="how long a batch waits for company (default 10 ms)"
    )
    p.add_argument("--no-batching", action="store_true", help="one request per generate call (--max-batch 1)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MB (default 20)")
    p.add_argument(
        "--default-max-tokens", type=int, default=256, help="answer length limit when a request sets none (default 256)"
    )


@dataclass
class Running:
    """A server running in a background thread of this process."""

    url: str
    server: object  # uvicorn.Server
    thread: threading.Thread
    batcher: Batcher

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def build(args: argparse.Namespace):
    """(FastAPI app, batcher, served model name) from the parsed flags.

    Raises:
        CheckpointError: the checkpoint is missing or incomplete, or a flag is out of range.
    """
    if args.max_batch < 1 or args.max_body_mb <= 0 or args.default_max_tokens < 1:
        raise CheckpointError("--max-batch and --default-max-tokens must be at least 1, --max-body-mb above 0")
    allow = None
    if args.allow_local_files:
        allow = Path(args.allow_local_files).expanduser()
        if not allow.is_dir():
            raise CheckpointError(f"--allow-local-files: '{allow}' is not a folder")
    folder, run = resolve_checkpoint(args.checkpoint)
    model, processor, saved = load_checkpoint(folder, device(), trust_remote_code=args.trust_remote_code)
    name = args.model_name or (run or folder).resolve().name
    engine = Engine(model, processor, name, with_overrides(saved, []).data)
    batcher = Batcher(engine, 1 if args.no_batching else args.max_batch, args.batch_wait_ms)
    options = ServeOptions(args.api_key, allow, int(args.max_body_mb * 2**20), args.default_max_tokens)
    return create_app(engine, batcher, options), batcher, name


def command(args: argparse.Namespace) -> int:
    """Serves until interrupted (Ctrl-C)."""
    import uvicorn

    app, batcher, name = build(args)
    if args.host not in LOCAL_HOSTS and not args.api_key:
        echo(f"warning: serving on {args.host} without --api-key: anyone who can reach this port can use the model")
    echo(
        f"serving '{name}' at http://{args.host}:{args.port}/v1 (batches of up to {batcher.max_batch}"
        f"{', API key required' if args.api_key else ''}); Ctrl-C stops"
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def start(args: argparse.Namespace, timeout: float = 60.0) -> Running:
    """Starts the server in a background thread on ``args.host`` and ``args.port`` (0: a free port) and waits until
    it answers."""
    import uvicorn

    app, batcher, _ = build(args)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="vlmtune-serve")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    host, port = sock.getsockname()[:2]
    return Running(f"http://{host}:{port}", server, thread, batcher)


def parse(argv: list[str]) -> argparse.Namespace:
    """The flags of ``vlmtune serve`` from a list, as the command line gives them (tests, the benchmark)."""
    p = argparse.ArgumentParser(prog="vlmtune serve")
    add_arguments(p)
    return p.parse_args(argv)
