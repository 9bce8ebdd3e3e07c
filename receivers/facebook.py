"""GET and POST /webhooks/facebook: Meta's verification handshake and leadgen notifications."""

import hashlib
import hmac

from flask import abort, request
from flask.typing import ResponseReturnValue

from core.config import Facebook, settings
from core.leads import MalformedPayload, facebook_event, facebook_leadgen_changes
from core.signatures import verify_hex_sha256
from receivers import webhooks
from receivers.common import accept, answer, describe, parse_json, read_body, reject, store_event

SOURCE = "facebook"


def _facebook() -> Facebook:
    config = settings().facebook
    if config is None:
        abort(404, "Facebook Lead Ads are not configured on this deployment.")
    return config


@webhooks.get("/facebook")
def facebook_verify() -> ResponseReturnValue:
    """Echo hub.challenge when Meta subscribes with our verify token."""
    config = _facebook()
    mode = request.args.get("hub.mode", "")
    token = request.args.get("hub.verify_token", "")
    challenge = request.args.get("hub.challenge", "")

    if (
        mode == "subscribe"
        and challenge
        and hmac.compare_digest(token.encode(), config.verify_token.encode())
    ):
        return challenge, 200, {"Content-Type": "text/plain; charset=utf-8"}
    return reject(SOURCE, 403, "The verification request does not carry our verify token.")


@webhooks.post("/facebook")
def facebook_leads() -> ResponseReturnValue:
    """Verify X-Hub-Signature-256, store one event per leadgen change and queue each."""
    config = _facebook()
    body = read_body(request, config.max_bytes)

    # Meta signs the bytes it sent (with / and non-ASCII escaped): never re-serialise.
    signature = request.headers.get("X-Hub-Signature-256")
    if not verify_hex_sha256(config.app_secret, body, signature):
        return reject(SOURCE, 401, "The X-Hub-Signature-256 header is missing or does not match.")

    try:
        changes = facebook_leadgen_changes(parse_json(body))
    except MalformedPayload as exc:
        return reject(SOURCE, 400, describe(exc))

    if not changes:
        digest = hashlib.sha256(body).hexdigest()
        return accept(
            SOURCE,
            None,
            body,
            kind="page",
            dedup_key=f"facebook:page:{digest}",
            ignore_reason="the notification has no leadgen change",
        )

    forms = settings().lead_capture.sources.facebook
    results = []
    for change in changes:
        form = forms.get(change["form_id"]) or forms.get("default")
        if form is None:
            results.append(
                store_event(
                    SOURCE,
                    None,
                    body,
                    kind="leadgen",
                    dedup_key=f"facebook:{change['leadgen_id']}",
                    ignore_reason=f"no flow acts on leads of form {change['form_id']}",
                )
            )
        else:
            results.append(store_event(SOURCE, facebook_event(change, form), body))

    events = [{"event_id": event_id, "status": status} for event_id, status in results]
    return answer(SOURCE, results[0][0], results[0][1], events=events)
