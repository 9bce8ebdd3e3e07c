"""The bare-Flask floor: one route that answers 200, served with the product's gunicorn.conf."""

from flask import Flask


def create_app() -> Flask:
    """A Flask app that only answers 200 to any POST under /webhooks/."""
    app = Flask(__name__)

    @app.post("/webhooks/<path:_source>")
    def ok(_source: str) -> tuple[str, int]:
        """Answer at once, whatever the body."""
        return "", 200

    return app
