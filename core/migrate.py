"""Bring the database named by DATABASE_URL to the newest Alembic revision."""

from pathlib import Path

from alembic import command
from alembic.config import Config

ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"


def upgrade_database() -> None:
    """Run every pending migration (the release phase and the demo call this)."""
    command.upgrade(Config(str(ALEMBIC_INI)), "head")
