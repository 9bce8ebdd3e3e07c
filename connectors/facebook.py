"""Facebook Graph API: read a lead-ad lead by its leadgen id."""

import hashlib
import hmac
import logging
from typing import Any

import requests

from connectors.errors import PermanentVendorError, TransientVendorError, VendorError
from connectors.retry import call_with_retry
from core.config import Facebook, Retry

logger = logging.getLogger(__name__)

VENDOR = "facebook"
LEAD_FIELDS = "id,created_time,ad_id,form_id,field_data"
# Graph's throttling codes: application, user, page and custom-level rate limits.
THROTTLING_CODES = {4, 17, 32, 613}


def _graph_error(response: requests.Response, what: str) -> VendorError:
    try:
        error = response.json().get("error") or {}
    except ValueError:
        error = {}
    code, subcode = error.get("code"), error.get("error_subcode")
    kwargs = {
        "status": response.status_code,
        "body": response.text,
        "request_id": error.get("fbtrace_id"),
    }
    if code == 190:
        return PermanentVendorError(
            VENDOR,
            f"{what}: the page access token is invalid or expired (Graph code 190); "
            "issue a new page token and set FACEBOOK_PAGE_ACCESS_TOKEN",
            **kwargs,
        )
    if code == 100 and subcode == 33:
        return PermanentVendorError(
            VENDOR,
            f"{what}: the lead cannot be read (Graph code 100/33): it does not exist "
            "or the app lacks the leads_retrieval permission on this page",
            **kwargs,
        )
    if code in THROTTLING_CODES or response.status_code == 429 or response.status_code >= 500:
        return TransientVendorError(
            VENDOR, f"{what}: Graph is throttling or failing (code {code})", **kwargs
        )
    return PermanentVendorError(
        VENDOR, f"{what} answered {response.status_code} (Graph code {code})", **kwargs
    )


class GraphClient:
    """The Graph calls the lead flow makes, with timeouts and the retry policy."""

    def __init__(self, settings: Facebook, retry: Retry) -> None:
        self._base = f"{settings.graph_url.rstrip('/')}/{settings.api_version}"
        self._token = settings.page_access_token
        # appsecret_proof ties each call to our app: a leaked token alone cannot read leads.
        self._proof = hmac.new(
            settings.app_secret.encode(), settings.page_access_token.encode(), hashlib.sha256
        ).hexdigest()
        self._timeout = settings.timeout_s
        self._retry = retry
        self._http = requests.Session()

    def _get(self, path: str, params: dict[str, str], what: str) -> dict[str, Any]:
        try:
            response = self._http.get(
                f"{self._base}/{path}",
                params={**params, "access_token": self._token, "appsecret_proof": self._proof},
                timeout=self._timeout,
            )
        except requests.RequestException as exc:
            raise TransientVendorError(VENDOR, f"{what}: {exc.__class__.__name__}") from exc
        if not response.ok:
            raise _graph_error(response, what)
        try:
            return response.json()
        except ValueError:
            raise TransientVendorError(VENDOR, f"{what}: the answer was not JSON") from None

    def lead(self, leadgen_id: str) -> dict[str, Any]:
        """GET /{leadgen_id}: the lead's field_data, form and ad."""
        return call_with_retry(
            lambda: self._get(leadgen_id, {"fields": LEAD_FIELDS}, "read lead"),
            self._retry,
            what="read lead",
        )
