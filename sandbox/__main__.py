"""Serve the sandbox: `python -m sandbox --host 127.0.0.1 --port 8900`."""

from __future__ import annotations

import argparse
import logging

from werkzeug.serving import make_server

from sandbox.app import create_sandbox_app

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and serve until interrupted, in one process (state lives in memory)."""
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--no-seed", action="store_true", help="start with empty vendors")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s %(message)s")

    server = make_server(
        args.host, args.port, create_sandbox_app(seed=not args.no_seed), threaded=True
    )
    # A parent process waits for exactly this line before it starts talking to us.
    print(f"sandbox listening on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("sandbox stopping")
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
