"""Notification templates: Jinja2 in a sandbox, one variant per part, from code or a directory.

A template has up to four parts: ``subject``, ``text``, ``html`` and ``sms``. Each is rendered in a
:class:`jinja2.sandbox.SandboxedEnvironment` with :class:`jinja2.StrictUndefined`, so a template
cannot reach Python internals and a missing variable is an error, never an empty string. Only the
``html`` part is autoescaped; the subject is stripped and must be one line.

**Directory layout.** With ``TemplateRegistry(directory)``, template ``<name>`` is the folder
``<directory>/<name>/`` holding any of these files::

    templates/
      welcome/
        subject.txt      the subject (one line once rendered; surrounding whitespace stripped)
        text.txt         the plain-text body (also email's text part)
        html.html        the HTML body (autoescaped)
        sms.txt          the SMS body
      billing/invoice/   a nested name: "billing/invoice"
        text.txt
      layouts/base.html  shared files: {% extends "layouts/base.html" %}
      partials/footer.txt                {% include "partials/footer.txt" %}

``{% include %}``, ``{% import %}`` and ``{% extends %}`` name files relative to ``directory``, from
directory and registered templates alike. Files are read when first rendered and re-read when they
change. A template registered in code with the same name as a folder wins over the folder (whole,
not part by part).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from dotmac.communications.errors import ConfigurationError, TemplateError

__all__ = ["PARTS", "RenderedTemplate", "TemplateRegistry"]

PARTS = ("subject", "text", "html", "sms")
"""The parts a template may have, in rendering order."""
_FILES = {"subject": "subject.txt", "text": "text.txt", "html": "html.html", "sms": "sms.txt"}
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")
_LISTED = 10


@dataclass(frozen=True, slots=True)
class RenderedTemplate:
    """A rendered template; a part the template does not have is None."""

    subject: str | None = None
    text: str | None = None
    html: str | None = None
    sms: str | None = None


class TemplateRegistry:
    """Named notification templates, registered in code or read from a directory.

    Args:
        directory: Folder of templates (layout in the module docstring); None for code only.

    Raises:
        ConfigurationError: ``directory`` is not an existing folder.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = None if directory is None else Path(directory)
        loader: jinja2.BaseLoader
        if self.directory is None:
            loader = jinja2.DictLoader({})
        elif not self.directory.is_dir():
            raise ConfigurationError(
                f"TemplateRegistry: template directory {str(self.directory)!r} is not a folder"
            )
        else:
            loader = jinja2.FileSystemLoader(self.directory)
        options: dict[str, Any] = {
            "loader": loader,
            "undefined": jinja2.StrictUndefined,
            "keep_trailing_newline": True,
        }
        # Subject, text and SMS are not HTML: escaping them would show "&amp;" to the reader.
        self._plain = SandboxedEnvironment(autoescape=False, **options)
        self._html = SandboxedEnvironment(autoescape=True, **options)
        self._registered: dict[str, dict[str, jinja2.Template]] = {}

    def _env(self, part: str) -> SandboxedEnvironment:
        return self._html if part == "html" else self._plain

    def register(
        self,
        name: str,
        *,
        subject: str | None = None,
        text: str | None = None,
        html: str | None = None,
        sms: str | None = None,
    ) -> None:
        """Compile and register a template (replacing one of the same name).

        Args:
            name: Template name: segments of letters, digits, ``_``, ``.`` and ``-`` joined by
                ``/``; a segment must not start with ``.``.
            subject: Subject source.
            text: Plain-text body source.
            html: HTML body source (autoescaped).
            sms: SMS body source.

        Raises:
            TemplateError: The name is invalid, no part is given, or a part does not compile
                (the message names the template, the part and the line).
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise TemplateError(
                f"invalid template name {name!r}: use letters, digits, '_', '.', '-' and '/' "
                "(no segment starting with '.')"
            )
        sources = {"subject": subject, "text": text, "html": html, "sms": sms}
        given = {part: source for part, source in sources.items() if source is not None}
        if not given:
            raise TemplateError(
                f"template {name!r} has no parts: give at least one of {', '.join(PARTS)}"
            )
        compiled: dict[str, jinja2.Template] = {}
        for part, source in given.items():
            if not isinstance(source, str):
                raise TemplateError(
                    f"template {name!r} part {part!r} must be a string, got {type(source).__name__}"
                )
            try:
                compiled[part] = self._env(part).from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                raise TemplateError(
                    f"template {name!r} part {part!r}: syntax error on line {exc.lineno}: "
                    f"{exc.message}"
                ) from exc
        self._registered[name] = compiled

    def render(self, name: str, context: Mapping[str, Any]) -> RenderedTemplate:
        """Render every part of template ``name`` with ``context``.

        Returns:
            The rendered parts; the subject stripped of surrounding whitespace.

        Raises:
            TemplateError: The template is unknown, does not compile, uses an undefined
                variable, attempts something the sandbox forbids, fails while rendering, or its
                subject spans more than one line. The message names the template and part.
        """
        templates = self._templates(name)
        variables = dict(context)
        rendered: dict[str, str] = {}
        for part, template in templates.items():
            text = _render_part(name, part, template, variables)
            if part == "subject":
                text = text.strip()
                if "\r" in text or "\n" in text:
                    raise TemplateError(
                        f"template {name!r} part 'subject' rendered to more than one line "
                        f"(CR/LF would inject email headers): {text[:80]!r}"
                    )
            rendered[part] = text
        return RenderedTemplate(**rendered)

    def names(self) -> list[str]:
        """Every template name, registered and in the directory, sorted."""
        return sorted(set(self._registered) | set(self._directory_names()))

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return name in self._registered or bool(self._directory_parts(name))

    # ------------------------------------------------------------------------------- lookup
    def _templates(self, name: str) -> dict[str, jinja2.Template]:
        if name in self._registered:
            return self._registered[name]
        templates: dict[str, jinja2.Template] = {}
        for part in self._directory_parts(name):
            try:
                templates[part] = self._env(part).get_template(f"{name}/{_FILES[part]}")
            except jinja2.TemplateSyntaxError as exc:
                raise TemplateError(
                    f"template {name!r} part {part!r} ({exc.filename}): syntax error on line "
                    f"{exc.lineno}: {exc.message}"
                ) from exc
            except jinja2.TemplateNotFound:  # removed since we looked; treat the part as absent
                continue
        if not templates:
            raise TemplateError(self._unknown(name))
        return templates

    def _directory_parts(self, name: str) -> list[str]:
        if self.directory is None or not _NAME.fullmatch(name):
            return []
        folder = self.directory.joinpath(*name.split("/"))
        return [part for part in PARTS if (folder / _FILES[part]).is_file()]

    def _directory_names(self) -> Iterator[str]:
        if self.directory is None:
            return
        files = set(_FILES.values())
        for folder, subfolders, filenames in os.walk(self.directory):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            name = Path(folder).relative_to(self.directory).as_posix()
            if name != "." and files.intersection(filenames) and _NAME.fullmatch(name):
                yield name

    def _unknown(self, name: str) -> str:
        known = self.names()
        if not known:
            return f"unknown template {name!r}; no templates are registered"
        listed = ", ".join(repr(n) for n in known[:_LISTED])
        more = f" and {len(known) - _LISTED} more" if len(known) > _LISTED else ""
        return f"unknown template {name!r}; known: {listed}{more}"


def _render_part(name: str, part: str, template: jinja2.Template, context: dict[str, Any]) -> str:
    where = f"template {name!r} part {part!r}"
    try:
        return template.render(context)
    except SecurityError as exc:
        raise TemplateError(f"{where}: refused by the sandbox: {exc}") from exc
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"{where}: undefined variable: {exc.message}") from exc
    except jinja2.TemplateNotFound as exc:
        raise TemplateError(f"{where}: included template {exc.name!r} not found") from exc
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"{where}: syntax error in {exc.filename or exc.name} on line {exc.lineno}: "
            f"{exc.message}"
        ) from exc
    except Exception as exc:
        # Deliberately broad: a template runs filters, tests and methods of context objects,
        # any of which may raise anything; to the caller that is one failed template.
        raise TemplateError(f"{where}: rendering failed: {type(exc).__name__}: {exc}") from exc
