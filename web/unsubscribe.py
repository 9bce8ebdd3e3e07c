"""GET and POST /unsubscribe/<token>: the signed link and RFC 8058 one-click unsubscribe."""

from flask import Blueprint, Response, abort
from markupsafe import escape

from core.config import settings
from core.store import Enrollment

unsubscribe = Blueprint("unsubscribe", __name__)

# Long enough for any token we sign; anything longer is not ours.
MAX_TOKEN_CHARS = 512

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 3em auto">{body}</body></html>
"""


def _page(title: str, body: str) -> Response:
    html = _PAGE.format(title=escape(title), body=body)
    response = Response(html, content_type="text/html; charset=utf-8")
    # The token is a credential for this one action: keep it out of caches and referrers.
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _enrollment(token: str) -> Enrollment:
    # Not at the top: flows.sequences brings the Gmail client and the Google libraries
    # (about 17 MB resident), which a web process loads only once someone unsubscribes.
    from flows.sequences import enrollment_for_token

    if len(token) > MAX_TOKEN_CHARS:
        abort(400, "This unsubscribe link is not valid: it is longer than any link we send.")
    enrollment = enrollment_for_token(token)
    if enrollment is None:
        abort(400, "This unsubscribe link is not valid; it may have been cut short.")
    return enrollment


@unsubscribe.get("/unsubscribe/<token>")
def confirm(token: str) -> Response:
    """A page with one button: link scanners fetch with GET, so GET changes nothing."""
    _enrollment(token)
    company = escape(settings().company_name)
    return _page(
        "Unsubscribe",
        f"<p>Stop the emails {company} sends you about your enquiry?</p>"
        '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
        '<button type="submit">Unsubscribe</button></form>',
    )


@unsubscribe.post("/unsubscribe/<token>")
def one_click(token: str) -> Response:
    """Mark the address opted out and stop its sequences (the button, or the mail client)."""
    from flows.sequences import opt_out  # local: see _enrollment

    opt_out(_enrollment(token), source="unsubscribe_link")
    company = escape(settings().company_name)
    return _page(
        "Unsubscribed",
        f"<p>You are unsubscribed: {company} will send you no more of these emails.</p>",
    )
