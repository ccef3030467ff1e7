"""Email templates: one sandboxed Jinja2 setup for composing (campaign) and sending (dispatcher).

Subject and text render without escaping, HTML with autoescape, all in a `SandboxedEnvironment`
so a template cannot reach Python internals. Every template sees the same context:
`{"contact": {...}, "unsubscribe_url": ..., **template_vars}`. Contact fields that are unknown
are left out of the context (not set to None), so `{{ contact.first_name | default("there") }}`
falls back as people expect, and `None` anywhere renders as an empty string.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any, Literal

from jinja2 import Template, TemplateSyntaxError
from jinja2.exceptions import TemplateError as JinjaTemplateError
from jinja2.sandbox import SandboxedEnvironment

__all__ = [
    "CompiledEmail",
    "TemplateProblem",
    "compile_email",
    "compile_template",
    "html_to_text",
    "render_context",
]

Part = Literal["subject", "html", "text"]


class TemplateProblem(ValueError):
    """A template that does not parse or cannot render; `part` and `line` say where."""

    def __init__(self, part: Part, message: str, line: int | None = None) -> None:
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{part}: {where}{message}")
        self.part = part
        self.line = line
        self.message = message


def _finalize(value: object) -> object:
    return "" if value is None else value


@functools.cache
def _environment(autoescape: bool) -> SandboxedEnvironment:
    return SandboxedEnvironment(
        autoescape=autoescape,
        finalize=_finalize,
        keep_trailing_newline=True,
        auto_reload=False,
        cache_size=0,
    )


def compile_template(part: Part, source: str) -> Template:
    """Parse one template (HTML escapes values, subject and text do not), or TemplateProblem."""
    try:
        return _environment(part == "html").from_string(source)
    except TemplateSyntaxError as exc:
        raise TemplateProblem(part, exc.message or "syntax error", exc.lineno) from None


@dataclass(frozen=True)
class CompiledEmail:
    """An email's templates, parsed once and rendered per recipient."""

    subject: Template
    html: Template | None
    text: Template | None

    def render(self, context: Mapping[str, Any]) -> tuple[str, str | None, str | None]:
        """(subject, html, text) for one recipient's context, or TemplateProblem."""
        return (
            _render("subject", self.subject, context).replace("\r", " ").replace("\n", " "),
            _render("html", self.html, context) if self.html is not None else None,
            _render("text", self.text, context) if self.text is not None else None,
        )


def _render(part: Part, template: Template, context: Mapping[str, Any]) -> str:
    try:
        return template.render(context)
    except JinjaTemplateError as exc:
        raise TemplateProblem(part, str(exc) or type(exc).__name__) from None
    except (ArithmeticError, TypeError, ValueError, LookupError) as exc:
        raise TemplateProblem(part, f"{type(exc).__name__}: {exc}") from None


def compile_email(subject: str, html_source: str | None, text_source: str | None) -> CompiledEmail:
    """Parse the three parts of an email; the first that does not parse raises TemplateProblem."""
    return CompiledEmail(
        subject=compile_template("subject", subject),
        html=compile_template("html", html_source) if html_source is not None else None,
        text=compile_template("text", text_source) if text_source is not None else None,
    )


def render_context(
    *,
    email: str,
    first_name: str | None = None,
    last_name: str | None = None,
    attributes: Mapping[str, Any] | None = None,
    unsubscribe_url: str,
    template_vars: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The context every template is rendered with, for one recipient."""
    contact: dict[str, Any] = {"email": email, "attributes": dict(attributes or {})}
    if first_name is not None:
        contact["first_name"] = first_name
    if last_name is not None:
        contact["last_name"] = last_name
    return {"contact": contact, "unsubscribe_url": unsubscribe_url, **(template_vars or {})}


_BLOCKS = frozenset(
    {
        *("address", "article", "aside", "blockquote", "div", "dl", "dt", "dd", "fieldset"),
        *("figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr"),
        *("li", "main", "nav", "ol", "p", "pre", "section", "table", "tr", "ul"),
    }
)
_PARAGRAPHS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol"})
_SKIPPED = frozenset({"head", "script", "style", "title", "template"})


class _TextExtractor(HTMLParser):
    """HTML to readable plain text: blocks become lines, links keep their target."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0
        self._hrefs: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED:
            self._skip_depth += 1
        elif tag == "br":
            self.parts.append("\n")
        elif tag == "li":
            self.parts.append("\n- ")
        elif tag in _BLOCKS:
            self.parts.append("\n\n" if tag in _PARAGRAPHS else "\n")
        elif tag == "a":
            self._hrefs.append(dict(attrs).get("href"))
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt:
                self.parts.append(alt)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED:
            self._skip_depth = max(self._skip_depth - 1, 0)
        elif tag in _BLOCKS and tag != "li":
            self.parts.append("\n\n" if tag in _PARAGRAPHS else "\n")
        elif tag == "a" and self._hrefs:
            href = self._hrefs.pop()
            if href and not href.startswith(("mailto:", "#")):
                self.parts.append(f" ({href})")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(source: str) -> str:
    """A plain-text rendering of HTML (used to derive the text part of an email)."""
    extractor = _TextExtractor()
    extractor.feed(source)
    extractor.close()
    lines = [line.strip() for line in "".join(extractor.parts).splitlines()]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
