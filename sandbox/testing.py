"""Run the sandbox in a background thread for tests, and drive its control API."""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from types import TracebackType
from typing import Any, Self

from werkzeug.serving import BaseWSGIServer, make_server

from sandbox.app import create_sandbox_app
from sandbox.state import EXTENSION_KEY, SandboxState

logger = logging.getLogger(__name__)


class SandboxError(RuntimeError):
    """The control API refused a request; the message is the sandbox's sentence."""


class SandboxServer:
    """The sandbox served on a free 127.0.0.1 port; use as a context manager or call start()."""

    def __init__(self, seed: bool = True, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = create_sandbox_app(seed=seed)
        self._host, self._port = host, port
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL of the running sandbox, without a trailing slash."""
        if self._server is None:
            raise RuntimeError("SandboxServer is not started.")
        return f"http://{self._host}:{self._server.server_port}"

    def start(self) -> Self:
        """Start serving in a daemon thread; returns self."""
        if self._server is None:
            self._server = make_server(self._host, self._port, self.app, threaded=True)
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="sandbox-server", daemon=True
            )
            self._thread.start()
            logger.info("sandbox started url=%s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server is None:
            return
        # Wake requests parked on a delay or timeout fault so shutdown does not wait for them.
        self.state_object.faults.clear()
        self.state_object.close()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server, self._thread = None, None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def state_object(self) -> SandboxState:
        """The in-process state, for tests that want more than the JSON dump."""
        state = self.app.extensions[EXTENSION_KEY]
        assert isinstance(state, SandboxState)
        return state

    def env(self) -> dict[str, str]:
        """Return the product's environment variables that point it at this sandbox."""
        return self.state_object.product_env(self.url)

    def state(self) -> dict[str, Any]:
        """Return GET /_sandbox/state."""
        return self._control("GET", "/state")

    def reset(self) -> None:
        """Return vendors to the seed and drop faults, settings and the call log."""
        self._control("POST", "/reset")

    def fault(self, **spec: Any) -> dict[str, Any]:
        """Arm a fault, e.g. fault(vendor="pipedrive", kind="429", count=3)."""
        return self._control("POST", "/faults", spec)

    def clear_faults(self) -> None:
        """Disarm every fault."""
        self._control("DELETE", "/faults")

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change settings: latency_ms, pipedrive_rate_limit, pipedrive_search_rate_limit, ..."""
        return self._control("POST", "/config", settings)

    def graph_lead(self, **lead: Any) -> dict[str, Any]:
        """Add a Graph lead: graph_lead(id=..., form_id=..., field_data=[...])."""
        return self._control("POST", "/graph/leads", lead)

    def gmail_reply(self, thread_id: str, sender: str, text: str) -> dict[str, Any]:
        """Make the lead reply in a Gmail thread; returns the message's id, threadId, labelIds."""
        return self._control(
            "POST", "/gmail/reply", {"thread_id": thread_id, "from": sender, "text": text}
        )

    def gmail_bounce(self, thread_id: str, recipient: str | None = None) -> dict[str, Any]:
        """Record a mailer-daemon bounce in a Gmail thread."""
        return self._control(
            "POST", "/gmail/bounce", {"thread_id": thread_id, "recipient": recipient}
        )

    def pipedrive_change_deal(self, deal_id: int, **fields: Any) -> dict[str, Any]:
        """Change a deal as a user in Pipedrive's UI would; webhooks say change_source app."""
        return self._control("POST", f"/pipedrive/deals/{deal_id}", fields)

    def pipedrive_deliveries(self) -> list[dict[str, Any]]:
        """Return every Pipedrive webhook delivery attempt so far."""
        result: list[dict[str, Any]] = self._control("GET", "/pipedrive/deliveries")
        return result

    def docusign_connect(self, **settings: Any) -> dict[str, Any]:
        """Point Connect at a listener: url, format json|xml, include_documents, keys, events."""
        return self._control("POST", "/docusign/connect", settings)

    def docusign_consent(self, granted: bool) -> None:
        """Grant or withdraw the impersonated user's consent to the JWT grant."""
        self._control("POST", "/docusign/consent", {"granted": granted})

    def docusign_act(self, envelope_id: str, action: str, **body: Any) -> dict[str, Any]:
        """Move an envelope: action deliver, sign, decline (reason=...) or void (reason=...)."""
        return self._control("POST", f"/docusign/envelopes/{envelope_id}/{action}", body)

    def docusign_deliveries(self) -> list[dict[str, Any]]:
        """Return every Connect delivery attempt so far, with headers and raw bodies."""
        result: list[dict[str, Any]] = self._control("GET", "/docusign/deliveries")
        return result

    def _control(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.url}/_sandbox{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise SandboxError(json.loads(exc.read()).get("error", str(exc))) from None
