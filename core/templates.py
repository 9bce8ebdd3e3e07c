"""Jinja2 rendering for email templates and the short templates in config.yaml."""

import functools
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, Template, select_autoescape
from jinja2.sandbox import SandboxedEnvironment

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"


@functools.cache
def _files() -> SandboxedEnvironment:
    # Sandboxed: templates are edited by sales ops, not by developers.
    return SandboxedEnvironment(
        loader=FileSystemLoader(TEMPLATE_DIR),
        autoescape=select_autoescape(["html", "html.j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )


@functools.cache
def _strings() -> SandboxedEnvironment:
    return SandboxedEnvironment(autoescape=False)


def render_file(name: str, context: dict[str, Any]) -> str:
    """Render templates/<name> with the context."""
    return _files().get_template(name).render(context)


@functools.lru_cache(maxsize=256)
def _compiled(source: str) -> Template:
    # config.yaml's templates are few and fixed: compile each once per process.
    return _strings().from_string(source)


def render_string(source: str, context: dict[str, Any]) -> str:
    """Render a one-line template from config.yaml (a deal title, a subject)."""
    return _compiled(source).render(context).strip()


def check_template(source: str) -> None:
    """Raise jinja2.TemplateSyntaxError when a config template does not parse."""
    _strings().parse(source)
