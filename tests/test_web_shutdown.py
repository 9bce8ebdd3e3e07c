"""The web process on SIGTERM: the request in flight is answered, new work is not taken."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, as_bytes, form_headers, load_fixture, queued_job_ids

BIN = Path(sys.executable).parent
# Heroku and Render kill a process 30 s after its SIGTERM; the web must be gone before.
DEADLINE_S = 25
# How long the client stalls mid-body after the SIGTERM: the worker must wait for it.
STALL_S = 1.5

Web = tuple[subprocess.Popen, int]


def web_command(*flags: str) -> list[str]:
    """The Procfile's web command from the venv, with extra flags before the app."""
    lines = (ROOT / "Procfile").read_text().splitlines()
    command = shlex.split(dict(line.split(": ", 1) for line in lines if line)["web"])
    assert command[0] == "gunicorn"
    # Command-line flags win over gunicorn.conf.py.
    return [str(BIN / "gunicorn"), *command[1:-1], *flags, command[-1]]


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(process: subprocess.Popen, port: int, log: Path) -> None:
    """Poll /healthz until a worker answers 200; fail with the log if the web dies."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the web exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:  # refused while booting, or a 503 (urllib's HTTPError is an OSError)
            pass
        time.sleep(0.1)
    pytest.fail(f"/healthz never answered 200:\n{log.read_text()[-3000:]}")


@pytest.fixture
def start_web(clean: None, tmp_path: Path) -> Iterator[Callable[..., Web]]:
    """Start the real web process on a free port; whatever is left is killed at teardown."""
    started: list[subprocess.Popen] = []

    def start(*flags: str) -> Web:
        port = free_port()
        env = {
            **os.environ,
            "PORT": str(port),
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
            "GUNICORN_LOG_LEVEL": "debug",
        }
        log = tmp_path / "web.log"
        # The default control socket is one path per user, shared with any other gunicorn.
        own_socket = ("--control-socket", str(tmp_path / "gunicorn.ctl"))
        with log.open("wb") as output:
            # Its own session: the group holds the master and its workers, as a dyno does.
            process = subprocess.Popen(
                web_command(*own_socket, *flags),
                cwd=ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(process)
        wait_until_healthy(process, port, log)
        return process, port

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """Bytes from the socket up to and including the marker."""
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"the connection closed before {marker!r}: {data!r}")
        data += chunk
    return data


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; a reset ends it like a close."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def start_delivery(port: int, body: bytes) -> socket.socket:
    """Send a signed form webhook's headers and half its body; return once a worker has it."""
    headers = {
        "Host": f"127.0.0.1:{port}",
        **form_headers(body),
        "Content-Length": str(len(body)),
        "Expect": "100-continue",
        "Connection": "close",
    }
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    sock.sendall(f"POST /webhooks/form HTTP/1.1\r\n{head}\r\n".encode() + body[: len(body) // 2])
    # gunicorn writes 100 Continue from the worker thread that parsed the request, as it
    # builds the WSGI environ: from here on the request is in flight inside a worker.
    assert read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 100 Continue\r\n")
    time.sleep(0.5)  # the view is now blocked reading the rest of the body
    return sock


def finish_delivery(sock: socket.socket, body: bytes) -> bytes:
    """Send the rest of the body and close; the raw answer, empty if the worker was gone."""
    with sock:
        try:
            sock.sendall(body[len(body) // 2 :])
        except (BrokenPipeError, ConnectionResetError):
            return b""
        return read_to_end(sock)


def parse(reply: bytes) -> tuple[int, Any]:
    """Status and JSON body of a raw HTTP/1.1 answer."""
    head, _, payload = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def open_new_request(port: int) -> socket.socket | None:
    """A new connection with a GET sent on it; None when the connect is refused."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    except ConnectionRefusedError:
        return None
    sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    return sock


def stored_events() -> list[Any]:
    """Every event in the store."""
    from sqlalchemy import select

    from core.store import Event, session

    with session() as db:
        return list(db.scalars(select(Event)))


@pytest.mark.parametrize(
    "whom",
    ["master", "group"],
    # Render signals the start command's process; Heroku signals every process in the dyno.
    ids=["sigterm-to-master", "sigterm-to-every-process"],
)
def test_sigterm_answers_the_request_in_flight_and_takes_no_new_work(start_web, whom) -> None:
    master, port = start_web()
    body = as_bytes(load_fixture("form/lead.json"))
    delivery = start_delivery(port, body)

    if whom == "master":
        master.send_signal(signal.SIGTERM)
    else:
        os.killpg(master.pid, signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(1.0)
    # The master has closed its listener; the workers have stopped accepting, but the busy
    # one still holds the listening socket, so the kernel may complete the handshake.
    newcomer = open_new_request(port)
    time.sleep(STALL_S - 1.0)
    reply = finish_delivery(delivery, body)

    status, answer = parse(reply) if reply else (None, reply)
    assert status == 200, f"the request in flight was cut off: {reply!r}"
    assert answer["status"] == "queued"
    [event] = stored_events()
    assert (event.id, event.source, event.status) == (answer["event_id"], "form", "queued")
    assert queued_job_ids() == [answer["event_id"]]

    exit_code = master.wait(timeout=max(DEADLINE_S - (time.monotonic() - signalled), 0.1))
    assert exit_code == 0
    assert time.monotonic() - signalled < DEADLINE_S
    # Refused, reset or closed unanswered once the last worker is gone: never served.
    if newcomer is not None:
        assert not read_to_end(newcomer).startswith(b"HTTP/")
        newcomer.close()


def test_without_a_grace_period_the_request_in_flight_is_cut_off(start_web) -> None:
    # The check above can fail: with no grace the master kills the busy worker at once.
    master, port = start_web("--graceful-timeout", "0")
    body = as_bytes(load_fixture("form/lead.json"))
    delivery = start_delivery(port, body)

    master.send_signal(signal.SIGTERM)
    time.sleep(STALL_S)
    reply = finish_delivery(delivery, body)

    assert reply == b""
    assert stored_events() == [] and queued_job_ids() == []
    assert master.wait(timeout=DEADLINE_S) == 0
