"""Running the app: a listening socket bound before the model loads (so a taken port fails at once), and
uvicorn with a shutdown that cancels generation, so SIGINT or SIGTERM stops the server within seconds.

On the first signal the queue stops taking requests and cancels the waiting ones; running requests get
``shutdown_grace`` seconds to finish, then are cancelled (a streamed one ends with an error event and
``data: [DONE]``); uvicorn then closes the connections. A second SIGINT exits at once.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import Any

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning to print when the server listens beyond this machine without a key."""
    if api_key or is_loopback(host):
        return None
    return (
        f"warning: listening on {host} without an API key: anyone who can reach this port can run the "
        "model (using this machine's CPU/GPU) and read the retrieval database's text through /v1/search. "
        "Set --api-key or RETLM_API_KEY, or bind to 127.0.0.1."
    )


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` (port 0: any free port); OSError when it cannot."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(128)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def make_server(app: Any, *, log_level: str = "warning", grace: float = 2.0) -> Any:
    """A ``uvicorn.Server`` for ``app`` whose exit (a signal, or ``should_exit``) first closes the
    app's request queue: waiting requests are cancelled, running ones get ``grace`` seconds."""
    import uvicorn

    service = app.state.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                print("retlm serve: stopping (a second Ctrl-C exits at once)", file=sys.stderr)
                service.worker.close(grace)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=int(grace) + 3,
        lifespan="on",
        access_log=log_level in ("debug", "info"),
    )
    return Server(config)
