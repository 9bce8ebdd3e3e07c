"""The funnel of deals per stage, read from Pipedrive, with conversion between stages."""

import logging
import time
from dataclasses import dataclass

from connectors import registry
from connectors.errors import VendorError
from core.config import Settings

logger = logging.getLogger(__name__)

# The overview is opened often; Pipedrive's rate limit is shared with the flows.
CACHE_S = 60.0
_cache: dict[str, tuple[float, "Funnel"]] = {}


@dataclass(frozen=True)
class FunnelStage:
    """How many deals reached a stage, and what share of the stage before did."""

    name: str
    reached: int
    conversion: float | None


@dataclass(frozen=True)
class Funnel:
    """The configured pipeline's funnel, or why it cannot be shown."""

    pipeline: str
    stages: list[FunnelStage]
    won: int
    error: str | None = None


def build(stages: list[dict], deals: list[dict]) -> tuple[list[FunnelStage], int]:
    """Stages in order; a deal reached every stage up to its own, a won deal all of them."""
    order = {stage["id"]: index for index, stage in enumerate(stages)}
    furthest = [
        len(stages) - 1 if deal.get("status") == "won" else order.get(deal["stage_id"], -1)
        for deal in deals
    ]
    funnel, before = [], None
    for index, stage in enumerate(stages):
        reached = sum(1 for position in furthest if position >= index)
        conversion = reached / before if before else None
        funnel.append(FunnelStage(stage["name"], reached, conversion))
        before = reached
    return funnel, sum(1 for deal in deals if deal.get("status") == "won")


def funnel(current: Settings) -> Funnel:
    """The lead pipeline's funnel, cached for a minute; Pipedrive down shows a sentence."""
    name = current.lead_capture.pipeline
    hit = _cache.get(name)
    if hit is not None and hit[0] > time.monotonic():
        return hit[1]
    pipedrive = registry.pipedrive()
    try:
        pipeline_id = pipedrive.pipeline_id(name)
        stages, won = build(
            pipedrive.pipeline_stages(pipeline_id), pipedrive.pipeline_deals(pipeline_id)
        )
    except VendorError as exc:
        logger.warning("funnel not read error=%s", exc.__class__.__name__)
        return Funnel(
            name, [], 0, "Pipedrive did not answer; the funnel shows again when it does."
        )
    result = Funnel(name, stages, won)
    _cache[name] = (time.monotonic() + CACHE_S, result)
    return result
