"""GET /healthz and GET /metrics."""

import redis

from tests.conftest import as_bytes, form_headers, load_fixture, run_worker


def test_healthz_is_200_when_database_and_redis_answer(client) -> None:
    answer = client.get("/healthz")
    assert answer.status_code == 200
    assert answer.json == {"status": "ok", "database": "ok", "redis": "ok"}


def test_healthz_is_503_when_redis_is_down(client, monkeypatch) -> None:
    from core import queue

    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    monkeypatch.setattr(queue, "connection", lambda: unreachable)
    answer = client.get("/healthz")
    assert answer.status_code == 503
    assert answer.json["status"] == "degraded" and answer.json["redis"].startswith("unreachable")


def test_metrics_show_webhooks_and_speed_to_lead_by_source(client, sandbox) -> None:
    body = as_bytes(load_fixture("form/lead.json"))
    client.post("/webhooks/form", data=body, headers=form_headers(body))
    client.post("/webhooks/form", data=body, headers=form_headers(body))
    run_worker()

    text = client.get("/metrics").get_data(as_text=True)
    assert 'salesflow_webhooks_total{source="form",status="queued"}' in text
    assert 'salesflow_webhooks_total{source="form",status="duplicate"}' in text
    # Observed in the worker, read by the web from Redis: one lead, under ten seconds.
    assert 'salesflow_speed_to_lead_seconds_count{source="form"} 1.0' in text
    assert 'salesflow_speed_to_lead_seconds_bucket{le="10.0",source="form"} 1.0' in text


def test_startup_warns_when_redis_may_evict_jobs(clean, caplog) -> None:
    import logging

    from core import queue

    connection = queue.connection()
    before = connection.config_get("maxmemory-policy")["maxmemory-policy"]
    connection.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with caplog.at_level(logging.WARNING, logger="core.queue"):
            queue.warn_if_evicting()
        assert "set it to noeviction" in caplog.text
        caplog.clear()
        connection.config_set("maxmemory-policy", "noeviction")
        with caplog.at_level(logging.WARNING, logger="core.queue"):
            queue.warn_if_evicting()
        assert "noeviction" not in caplog.text
    finally:
        connection.config_set("maxmemory-policy", before)
