"""Template registry: sandboxed Jinja2, strict variables, HTML-only escaping, code and directory."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from dotmac.communications.errors import ConfigurationError, TemplateError
from dotmac.communications.notifications._templates import RenderedTemplate, TemplateRegistry


@pytest.fixture
def registry() -> TemplateRegistry:
    """A code-only registry with one template of every part."""
    reg = TemplateRegistry()
    reg.register(
        "welcome",
        subject="  Welcome, {{ name }}!\n",
        text="Hi {{ name }},\n{{ note }}\n",
        html="<p>Hi {{ name }}</p><p>{{ note }}</p>",
        sms="Hi {{ name }}: {{ note }}",
    )
    return reg


def write(root: Path, files: dict[str, str]) -> Path:
    """Create ``files`` (relative path → content) under ``root``."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    return root


def test_render_every_part(registry: TemplateRegistry) -> None:
    """All four parts render; the subject is stripped; trailing newlines are kept elsewhere."""
    out = registry.render("welcome", {"name": "Ada", "note": "ok"})
    assert out == RenderedTemplate(
        subject="Welcome, Ada!",
        text="Hi Ada,\nok\n",
        html="<p>Hi Ada</p><p>ok</p>",
        sms="Hi Ada: ok",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.text = "changed"  # type: ignore[misc]


def test_missing_parts_are_none() -> None:
    """A template with only an SMS part renders None for the others."""
    reg = TemplateRegistry()
    reg.register("code", sms="Your code is {{ code }}")
    assert reg.render("code", {"code": "123456"}) == RenderedTemplate(sms="Your code is 123456")


def test_html_part_only_is_autoescaped(registry: TemplateRegistry) -> None:
    """Markup in the context is escaped in HTML, verbatim in subject, text and SMS."""
    evil = "<script>alert('x')</script> & co"
    out = registry.render("welcome", {"name": "Bob", "note": evil})
    assert out.html == (
        "<p>Hi Bob</p><p>&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; co</p>"
    )
    assert out.text == f"Hi Bob,\n{evil}\n"
    assert out.sms == f"Hi Bob: {evil}"
    assert registry.render("welcome", {"name": "A & B", "note": ""}).subject == "Welcome, A & B!"


def test_undefined_variable_names_template_part_and_variable(registry: TemplateRegistry) -> None:
    """StrictUndefined: a missing variable is a TemplateError, never an empty string."""
    with pytest.raises(TemplateError, match=r"'welcome' part 'subject'.*'name' is undefined"):
        registry.render("welcome", {"note": "x"})
    reg = TemplateRegistry()
    reg.register("t", text="{{ user.email }}")
    with pytest.raises(TemplateError, match=r"'t' part 'text'.*no attribute 'email'"):
        reg.render("t", {"user": {}})


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ '{0.__class__}'.format(1) }}",
        "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    ],
)
def test_sandbox_escapes_are_template_errors(source: str) -> None:
    """Reaching for Python internals is refused by the sandbox and reported as TemplateError."""
    reg = TemplateRegistry()
    reg.register("evil", text=source)
    with pytest.raises(TemplateError, match=r"'evil' part 'text'.*(sandbox|unsafe)"):
        reg.render("evil", {})


def test_syntax_error_at_register_names_template_and_part() -> None:
    """A template that does not compile fails at register, naming template, part and line."""
    reg = TemplateRegistry()
    with pytest.raises(TemplateError, match=r"'broken' part 'html': syntax error on line 2"):
        reg.register("broken", text="fine", html="<p>\n{% if x %}</p>")
    assert "broken" not in reg
    with pytest.raises(TemplateError, match="no parts"):
        reg.register("empty")
    with pytest.raises(TemplateError, match="invalid template name"):
        reg.register("../escape", text="x")


def test_multiline_subject_is_refused() -> None:
    """A subject that renders to several lines (header injection) is a TemplateError."""
    reg = TemplateRegistry()
    reg.register("s", subject="Hello {{ name }}")
    with pytest.raises(TemplateError, match=r"'s' part 'subject'.*more than one line"):
        reg.render("s", {"name": "x\r\nBcc: victim@example.com"})


def test_unknown_template_lists_known_names() -> None:
    """Rendering an unknown name says so and lists the first known names."""
    reg = TemplateRegistry()
    with pytest.raises(TemplateError, match="unknown template 'nope'; no templates"):
        reg.render("nope", {})
    for n in range(12):
        reg.register(f"t{n:02}", text="x")
    with pytest.raises(
        TemplateError, match=r"unknown template 'nope'; known: 't00', .*'t09' and 2 more"
    ):
        reg.render("nope", {})


def test_render_time_failures_are_template_errors() -> None:
    """A filter or context object raising while rendering becomes a TemplateError."""
    reg = TemplateRegistry()
    reg.register("div", text="{{ 1 // n }}")
    with pytest.raises(TemplateError, match=r"'div' part 'text'.*ZeroDivisionError"):
        reg.render("div", {"n": 0})
    reg.register("inc", text="{% include 'missing.txt' %}")
    with pytest.raises(TemplateError, match=r"'inc' part 'text'.*'missing.txt' not found"):
        reg.render("inc", {})


def test_directory_templates_with_include_and_extends(tmp_path: Path) -> None:
    """Folders are templates; include/extends resolve inside the directory; HTML is escaped."""
    root = write(
        tmp_path,
        {
            "welcome/subject.txt": "Welcome {{ name }}\n",
            "welcome/text.txt": "Hi {{ name }}\n{% include 'partials/footer.txt' %}",
            "welcome/html.html": (
                "{% extends 'layouts/base.html' %}{% block body %}Hi {{ name }}{% endblock %}"
            ),
            "billing/invoice/sms.txt": "Invoice {{ number }}",
            "layouts/base.html": "<html><body>{% block body %}{% endblock %}</body></html>\n",
            "partials/footer.txt": "-- {{ company }}\n",
            ".hidden/text.txt": "not a template",
        },
    )
    reg = TemplateRegistry(root)
    assert reg.names() == ["billing/invoice", "welcome"]
    assert "welcome" in reg
    assert "billing/invoice" in reg
    assert "partials" not in reg
    assert 42 not in reg
    out = reg.render("welcome", {"name": "<b>Ann</b>", "company": "ACME & Co"})
    assert out == RenderedTemplate(
        subject="Welcome <b>Ann</b>",
        text="Hi <b>Ann</b>\n-- ACME & Co\n",
        html="<html><body>Hi &lt;b&gt;Ann&lt;/b&gt;</body></html>\n",
    )
    assert reg.render("billing/invoice", {"number": 7}) == RenderedTemplate(sms="Invoice 7")
    with pytest.raises(TemplateError, match=re.escape("unknown template '../welcome'")):
        reg.render("../welcome", {})


def test_registered_template_wins_and_may_include_directory_files(tmp_path: Path) -> None:
    """Code beats a folder of the same name; code templates can include directory files."""
    root = write(
        tmp_path,
        {"welcome/text.txt": "from disk", "partials/sig.txt": "-- {{ company }}"},
    )
    reg = TemplateRegistry(root)
    reg.register("welcome", text="from code {% include 'partials/sig.txt' %}")
    assert reg.render("welcome", {"company": "ACME"}).text == "from code -- ACME"
    assert reg.names() == ["welcome"]


def test_directory_syntax_error_names_template_and_part(tmp_path: Path) -> None:
    """A broken file fails at render with template, part and line."""
    reg = TemplateRegistry(write(tmp_path, {"bad/html.html": "ok\n{% for %}"}))
    with pytest.raises(TemplateError, match=r"'bad' part 'html'.*syntax error on line 2"):
        reg.render("bad", {})


def test_directory_changes_are_picked_up(tmp_path: Path) -> None:
    """Editing a template file is seen on the next render."""
    reg = TemplateRegistry(write(tmp_path, {"t/text.txt": "one"}))
    assert reg.render("t", {}).text == "one"
    path = tmp_path / "t" / "text.txt"
    path.write_text("two", encoding="utf-8")
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 5))
    assert reg.render("t", {}).text == "two"


def test_missing_directory_is_a_configuration_error(tmp_path: Path) -> None:
    """A directory that does not exist fails at construction, naming it."""
    with pytest.raises(ConfigurationError, match="nowhere"):
        TemplateRegistry(tmp_path / "nowhere")
