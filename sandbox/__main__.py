"""Serve the sandbox: `python -m sandbox --host 127.0.0.1 --port 8900`."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from gunicorn.app.base import BaseApplication

from sandbox.app import create_sandbox_app

logger = logging.getLogger(__name__)

# Requests parked on a delay or timeout fault hold a thread each; the vendors' clients keep
# connections alive, as the real APIs allow, so every idle kept-alive connection holds one too.
THREADS = 64
KEEPALIVE_S = 30


class _Server(BaseApplication):
    """Gunicorn in one process (the emulators' state lives in its memory), many threads.

    Werkzeug's development server closes the connection after every response; the vendors
    do not, and a client that reconnects per call would look cheaper or dearer than it is.
    """

    def __init__(self, host: str, port: int, seed: bool, log_level: str) -> None:
        self._options = {
            "bind": f"{host}:{port}",
            "workers": 1,
            "worker_class": "gthread",
            "threads": THREADS,
            "keepalive": KEEPALIVE_S,
            # Never recycle the worker: that would wipe the emulators' state.
            "max_requests": 0,
            "timeout": 120,
            "graceful_timeout": 1,
            "accesslog": None,
            "loglevel": log_level.lower(),
            "when_ready": _announce(host, port),
        }
        self._seed = seed
        super().__init__()

    def load_config(self) -> None:
        """Hand our settings to gunicorn."""
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        """The sandbox app, built in the worker process."""
        return create_sandbox_app(seed=self._seed)


def _announce(host: str, port: int) -> Any:
    def when_ready(server: Any) -> None:
        # A parent process waits for exactly this line before it starts talking to us.
        print(f"sandbox listening on http://{host}:{port}", flush=True)

    return when_ready


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and serve until SIGTERM or Ctrl-C, in one process."""
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--no-seed", action="store_true", help="start with empty vendors")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.port == 0:
        parser.error("--port must name a port (the parent needs to know it)")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s %(message)s")
    _Server(args.host, args.port, not args.no_seed, args.log_level).run()


if __name__ == "__main__":
    main()
