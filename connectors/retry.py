"""The one retry policy: which errors are transient, how long to wait, when to give up."""

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from connectors.errors import TransientVendorError
from core.config import Retry

logger = logging.getLogger(__name__)

T = TypeVar("T")


def backoff_delay(attempt: int, policy: Retry) -> float:
    """Exponential backoff with full jitter for the given 1-based attempt."""
    ceiling = min(policy.max_delay_s, policy.base_delay_s * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def call_with_retry(
    call: Callable[[], T],
    policy: Retry,
    *,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run a vendor call, retrying transient errors; the vendor's own wait comes first."""
    attempt = 1
    while True:
        try:
            return call()
        except TransientVendorError as exc:
            if exc.ambiguous:
                # The vendor may have done it: RunContext.once asks before any second try.
                raise
            if attempt >= policy.attempts:
                logger.warning("giving up what=%s attempts=%d error=%s", what, attempt, exc)
                raise
            delay = (
                exc.retry_after if exc.retry_after is not None else backoff_delay(attempt, policy)
            )
            if delay > policy.max_delay_s:
                # A long vendor wait (a daily budget spent) is the job queue's business,
                # not a reason to hold a worker asleep.
                logger.warning("wait too long what=%s delay=%.1fs error=%s", what, delay, exc)
                raise
            logger.info(
                "retrying what=%s attempt=%d delay=%.2fs error=%s", what, attempt, delay, exc
            )
            sleep(delay)
            attempt += 1
