"""One Flask app serving every vendor emulator under its prefix, plus the control API."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Blueprint, Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from sandbox import docusign, facebook, google, pipedrive
from sandbox.state import EXTENSION_KEY, SandboxState, current_state
from sandbox.vendor import VendorEmulator

logger = logging.getLogger(__name__)

control = Blueprint("sandbox_control", __name__, url_prefix="/_sandbox")


def create_sandbox_app(seed: bool = True) -> Flask:
    """Build the sandbox app; `seed` loads the demo data that matches the shared fixtures."""
    app = Flask(__name__)
    # Vendors send UTF-8 as is and keep their key order; tests compare against that.
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    app.json.sort_keys = False  # type: ignore[attr-defined]
    emulators: list[VendorEmulator] = [
        pipedrive.from_env(), google.from_env(), facebook.from_env(), docusign.from_env(),
    ]  # fmt: skip
    app.extensions[EXTENSION_KEY] = SandboxState(emulators, seed=seed)
    for emulator in emulators:
        app.register_blueprint(emulator.blueprint(), url_prefix=emulator.prefix)
        vendor_control = emulator.control_blueprint()
        if vendor_control is not None:
            app.register_blueprint(vendor_control)
    app.register_blueprint(control)
    app.before_request(_before_vendor_call)
    app.after_request(_after_vendor_call)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def _vendor_for(path: str) -> tuple[VendorEmulator, str] | None:
    for emulator in current_state().emulators.values():
        if path == emulator.prefix or path.startswith(emulator.prefix + "/"):
            return emulator, path[len(emulator.prefix) :] or "/"
    return None


def _before_vendor_call() -> Response | None:
    routed = _vendor_for(request.path)
    if routed is None:
        return None
    emulator, path = routed
    g.sandbox_vendor, g.sandbox_path = emulator, path
    state = current_state()

    latency_ms = state.setting("latency_ms")
    if latency_ms:
        time.sleep(latency_ms / 1000)

    spec = state.faults.take(emulator.name, request.method, path)
    if spec is not None:
        logger.info("fault hit id=%s kind=%s %s %s", spec.id, spec.kind, request.method, path)
        if spec.kind == "delay":
            state.faults.sleep(spec.delay_ms)
        elif spec.kind == "timeout":
            # The call still takes effect and only the answer is late: that is what makes a
            # client timeout dangerous (the retry must not repeat the side effect).
            g.sandbox_timeout_ms = spec.delay_ms
        else:
            return emulator.fault_response(spec, path)
    return emulator.guard(path)


def _after_vendor_call(response: Response) -> Response:
    emulator: VendorEmulator | None = g.get("sandbox_vendor")
    if emulator is None:
        return response
    path: str = g.sandbox_path
    response = emulator.decorate(response, path)
    state = current_state()
    state.log_call(emulator.name, request.method, path, response.status_code)
    timeout_ms: int | None = g.get("sandbox_timeout_ms")
    if timeout_ms:
        state.faults.sleep(timeout_ms)
    return response


def _http_error(exc: HTTPException) -> Response:
    routed = _vendor_for(request.path)
    code = exc.code or 500
    if routed is None:
        response = jsonify({"error": exc.description})
        response.status_code = code
        return response
    emulator, path = routed
    return emulator.error_response(code, exc.description or exc.name, path)


def _unexpected_error(exc: Exception) -> Response:
    # An emulator bug must still look like a vendor 500 so the product's error path runs.
    logger.exception("sandbox error on %s %s", request.method, request.path)
    routed = _vendor_for(request.path)
    if routed is None:
        response = jsonify({"error": f"Sandbox error: {exc!r}"})
        response.status_code = 500
        return response
    emulator, path = routed
    return emulator.error_response(500, "Internal server error", path)


def _bad_request(message: str) -> Response:
    response = jsonify({"error": message})
    response.status_code = 400
    return response


@control.get("/health")
def health() -> Response:
    """Answer 200 while the sandbox serves."""
    return jsonify({"status": "ok"})


@control.post("/reset")
def reset() -> Response:
    """Return every vendor to its seed and drop faults, settings and the call log."""
    current_state().reset()
    return jsonify({"status": "reset"})


@control.get("/state")
def state_dump() -> Response:
    """Dump everything the emulators hold."""
    return jsonify(current_state().snapshot())


@control.post("/faults")
def add_fault() -> Response:
    """Arm a fault from a JSON spec."""
    try:
        spec = current_state().faults.add(request.get_json(silent=True))
    except (TypeError, ValueError) as exc:
        return _bad_request(str(exc))
    return jsonify(spec.to_dict())


@control.delete("/faults")
def clear_faults() -> Response:
    """Disarm every fault."""
    current_state().faults.clear()
    return jsonify({"status": "cleared"})


@control.get("/config")
def get_config() -> Response:
    """Show the current settings."""
    return jsonify(current_state().snapshot()["config"])


@control.post("/config")
def set_config() -> Response:
    """Change settings such as latency and rate limits."""
    raw: Any = request.get_json(silent=True)
    try:
        config = current_state().configure(raw)
    except (TypeError, ValueError) as exc:
        return _bad_request(str(exc))
    return jsonify(config)


@control.get("/env")
def product_env() -> Response:
    """Show the environment variables that point the product at this sandbox."""
    return jsonify(current_state().product_env(request.host_url.rstrip("/")))
