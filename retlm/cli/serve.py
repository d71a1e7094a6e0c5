"""`retlm serve`: an OpenAI-compatible HTTP endpoint that retrieves while it generates, with a web page.

Heavy imports (torch, transformers, FastAPI, uvicorn) happen inside the command, so `retlm --help` stays
fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retlm.errors import OptionError, check_int
from retlm.options import add_dataclass_arguments, flag_of, option, options_from

DESCRIPTION = (
    "Serve MODEL over HTTP with OpenAI's API (POST /v1/completions, /v1/chat/completions; GET /v1/models), "
    "plus POST /v1/search (the database's nearest chunks), GET /health and a web page at / that shows the "
    "passages read at each retrieval step beside the generated text. Every response carries an extra "
    "`retrieval` field: the position of each retrieval step and its neighbors (document, chunk id, score, "
    "text). MODEL is a RETRO or RETRO-fit run (retrieval through chunked cross-attention at every chunk "
    "boundary), or, with --in-context, any causal LM (a name such as smollm2-135m, an HF folder, a .gguf "
    "file or a Hub name) that reads retrieved passages in its context. A request may set "
    '"retrieval": false to generate without retrieval. Requests share the model through one queue and are '
    "batched when their sampling settings match. Needs the serve extra: pip install 'retlm[serve]'."
)
API_KEY_VARIABLE = "RETLM_API_KEY"


@dataclass
class ServeOptions:
    """The options of `retlm serve` (``validate()`` checks them all before anything loads)."""

    model: str = option(
        positional=True,
        metavar="MODEL",
        help="a RETRO / RETRO-fit run or model folder; with --in-context any causal LM (name, folder, .gguf)",
    )
    db: Path | None = option(
        None,
        metavar="DB",
        help="retrieval database (needed for a RETRO model; with --in-context, none serves the model alone)",
    )
    in_context: bool = option(
        False,
        flag="--in-context",
        help="MODEL is any causal LM; every --stride tokens the recent text is searched and the passages "
        "are put in front of its context (In-Context RALM)",
    )
    host: str = option("127.0.0.1", help="address to listen on (beyond loopback, set an API key)")
    port: int = option(8000, help="port to listen on (0: any free port, printed at start)")
    api_key: str | None = option(
        None,
        help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_VARIABLE}; "
        "the variable keeps the key out of the process list)",
    )
    served_model_name: str | None = option(
        None, help="the model id clients send and /v1/models lists (default: MODEL as given)"
    )
    max_tokens: int = option(512, help="the largest max_tokens a request may ask (and the chat default)")
    max_batch: int = option(16, help="rows decoded together (1: requests run one at a time)")
    batch_wait_ms: float = option(
        20.0, help="milliseconds an idle server waits for more requests to batch with the first (0: none)"
    )
    max_queue: int = option(64, help="requests that may wait; more get 503")
    max_body_bytes: int = option(1 << 20, help="the largest request body; larger ones get 413")
    stride: int = option(16, help="--in-context: tokens generated between two retrievals")
    query_tokens: int = option(32, help="--in-context: the most recent tokens that form the query")
    shutdown_grace: float = option(2.0, help="seconds running requests get to finish on SIGINT / SIGTERM")
    log_level: str = option(
        "warning", choices=("critical", "error", "warning", "info", "debug"), help="uvicorn's log level"
    )

    def validate(self) -> None:
        """Every option (and that --db is a folder), before the port is taken or the model loads."""
        if not 0 <= self.port <= 65535:
            raise OptionError(f"--port must be in 0..65535, got {self.port}")
        for name in ("max_tokens", "max_batch", "max_queue", "max_body_bytes", "stride", "query_tokens"):
            check_int(flag_of(ServeOptions, name), getattr(self, name))
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise OptionError(f"--batch-wait-ms must be in 0..10000, got {self.batch_wait_ms}")
        if not 0 <= self.shutdown_grace <= 600:
            raise OptionError(f"--shutdown-grace must be in 0..600 seconds, got {self.shutdown_grace}")
        if self.db is None and not self.in_context:
            raise OptionError("--db is needed to serve a RETRO model (or give --in-context for a causal LM)")
        if self.db is not None and not self.db.is_dir():
            raise OptionError(f"--db: no database folder at {self.db}")
        if self.api_key is not None and not self.api_key.strip():
            raise OptionError("--api-key is empty")
        if self.served_model_name is not None and not 0 < len(self.served_model_name) <= 256:
            raise OptionError("--served-model-name must hold 1 to 256 characters")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API that retrieves, with a web page",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dataclass_arguments(parser, ServeOptions)
    parser.set_defaults(func=run_serve)


def load_backend(opts: ServeOptions) -> Any:
    """The model and database of ``opts`` behind the server's backend protocol."""
    from retlm.retrieval import RetrievalDatabase
    from retlm.serve import CausalLMBackend, CCABackend

    database = RetrievalDatabase.open(opts.db) if opts.db is not None else None
    if opts.in_context:
        from retlm.models.pretrained import load_causal_lm

        model, tokenizer = load_causal_lm(opts.model)
        return CausalLMBackend(
            model,
            tokenizer,
            database,
            max_batch=opts.max_batch,
            stride=opts.stride,
            query_tokens=opts.query_tokens,
        )
    from retlm.models.auto import load_model
    from retlm.training.checkpoint import check_model_fits_database

    model = load_model(opts.model)
    check_model_fits_database(model.config, database)
    return CCABackend(model, database, max_batch=opts.max_batch)


def run_serve(args: argparse.Namespace) -> int:
    opts = options_from(args, ServeOptions)
    if opts.api_key is None:
        opts.api_key = os.environ.get(API_KEY_VARIABLE) or None
    opts.validate()
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise OptionError(
            f"retlm serve needs the serve extra: pip install 'retlm[serve]' ({err.name} missing)"
        ) from None
    from retlm.serve import ServeSettings, create_app
    from retlm.serve.server import exposure_warning, listen, make_server

    warning = exposure_warning(opts.host, opts.api_key)
    if warning:
        print(f"retlm serve: {warning}", file=sys.stderr)
    try:
        sock = listen(opts.host, opts.port)  # before the model loads: a taken port fails at once
    except OSError as err:
        raise OptionError(f"cannot listen on {opts.host}:{opts.port}: {err.strerror or err}") from None
    backend = load_backend(opts)
    settings = ServeSettings(
        model_id=opts.served_model_name or opts.model,
        max_tokens=opts.max_tokens,
        max_batch=opts.max_batch,
        batch_wait=opts.batch_wait_ms / 1000,
        max_queue=opts.max_queue,
        max_body_bytes=opts.max_body_bytes,
        api_key=opts.api_key,
        shutdown_grace=opts.shutdown_grace,
    )
    app = create_app(backend, settings)
    server = make_server(app, log_level=opts.log_level, grace=opts.shutdown_grace)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"retlm serve: {settings.model_id} ({backend.kind} retrieval) on http://{shown}:{port}/", flush=True
    )
    server.run(sockets=[sock])
    return 0
