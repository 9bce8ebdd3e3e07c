"""Blueprints that are not webhook receivers: health, metrics, run history."""
