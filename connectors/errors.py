"""Errors raised by connectors; they keep the vendor's status, body and request id."""


class VendorError(Exception):
    """A vendor call that did not succeed."""

    transient = False

    def __init__(
        self,
        vendor: str,
        message: str,
        *,
        status: int | None = None,
        body: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        ambiguous: bool = False,
    ) -> None:
        super().__init__(f"{vendor}: {message}")
        self.vendor = vendor
        self.status = status
        # Vendor bodies can echo what we sent (names, emails): keep them short.
        self.body = (body or "")[:2000]
        self.request_id = request_id
        self.retry_after = retry_after
        # A write whose outcome is unknown (timed out, or a 5xx after it was sent): trying
        # it again blindly could do it twice. Only the caller can look first.
        self.ambiguous = ambiguous


class TransientVendorError(VendorError):
    """Worth trying again: 429, 5xx, timeouts, connection errors, throttling 403s."""

    transient = True


class PermanentVendorError(VendorError):
    """Trying again will not help: bad request, bad credentials, missing object."""


class FlowAbort(Exception):
    """The event cannot be processed as it stands; the run fails with this reason."""


class FlowIgnored(Exception):
    """The event needs no work after all; the run ends `ignored` with this reason."""
