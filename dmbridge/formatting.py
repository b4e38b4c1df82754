"""Message text: HTML cut down to what Matrix clients render, markdown in, plain text always.

The allowed tags and attributes are the Matrix spec's recommended set for ``m.room.message``
(client-server API, "m.room.message msgtypes"); images may only point into the homeserver's
media repository (``mxc://``). Used both ways: on what platforms send in, and on what Matrix
users send out, so neither side can inject scripts or styles into the other.
"""

from __future__ import annotations

import html as html_lib
import re
from dataclasses import dataclass

import nh3
from markdown_it import MarkdownIt

from .errors import InvalidParam

HTML_FORMAT = "org.matrix.custom.html"
MSGTYPES = {"text": "m.text", "notice": "m.notice", "emote": "m.emote"}

_TAGS = {
    "font", "del", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "p", "a", "ul", "ol", "sup",
    "sub", "li", "b", "i", "u", "strong", "em", "s", "code", "hr", "br", "div", "table",
    "thead", "tbody", "tr", "th", "td", "caption", "pre", "span", "img", "details", "summary",
}
_COLOURS = {"data-mx-bg-color", "data-mx-color"}
_ATTRIBUTES = {
    "font": _COLOURS | {"color"},
    "span": _COLOURS | {"data-mx-spoiler", "data-mx-maths"},
    "div": {"data-mx-maths"},
    "a": {"href", "target"},
    "img": {"width", "height", "alt", "title", "src"},
    "ol": {"start"},
    "code": {"class"},
}
_URL_SCHEMES = {"https", "http", "ftp", "mailto", "magnet", "mxc"}
_CLEAN_CONTENT = {"script", "style"}  # dropped with what they hold, not just unwrapped
_LANGUAGE_CLASS = re.compile(r"language-[A-Za-z0-9_+#.-]{1,40}")
_COLOUR = re.compile(r"#[0-9A-Fa-f]{6}")
_BLOCK_END = re.compile(r"<br\s*/?>|</(p|div|li|tr|h[1-6]|blockquote|pre)>", re.IGNORECASE)


def _keep(tag: str, attribute: str, value: str) -> str | None:
    if tag == "img" and attribute == "src":
        return value if value.startswith("mxc://") else None
    if tag == "a" and attribute == "href" and value.startswith("mxc://"):
        return None
    if tag == "a" and attribute == "target":
        return value if value == "_blank" else None
    if tag == "code" and attribute == "class":
        classes = [c for c in value.split() if _LANGUAGE_CLASS.fullmatch(c)]
        return " ".join(classes) or None
    if attribute in _COLOURS or (tag == "font" and attribute == "color"):
        return value if _COLOUR.fullmatch(value) else None
    return value


_CLEANER = nh3.Cleaner(
    tags=_TAGS, clean_content_tags=_CLEAN_CONTENT, attributes=_ATTRIBUTES,
    attribute_filter=_keep, url_schemes=_URL_SCHEMES, link_rel=None,
)
_TEXT_ONLY = nh3.Cleaner(tags=set(), clean_content_tags=_CLEAN_CONTENT, attributes={})
# CommonMark with tables and strikethrough; raw HTML in markdown is shown as text, not run.
_MARKDOWN = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable(
    ["table", "strikethrough"]
)


def sanitize(html: str) -> str:
    """What is left of ``html`` that Matrix clients render safely."""
    return _CLEANER.clean(html).strip()


def html_to_text(html: str) -> str:
    """A plain-text rendering of HTML, for the ``body`` every message must have."""
    marked = _BLOCK_END.sub(lambda m: m.group(0) + "\n", html)
    text = html_lib.unescape(_TEXT_ONLY.clean(marked))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def markdown_to_html(markdown: str) -> str:
    return sanitize(_MARKDOWN.render(markdown))


@dataclass(frozen=True)
class Text:
    """A message's text as Matrix wants it: a plain body, and HTML when there is formatting."""

    body: str
    html: str | None
    msgtype: str

    def content(self) -> dict[str, str]:
        content = {"msgtype": self.msgtype, "body": self.body}
        if self.html is not None:
            content.update(format=HTML_FORMAT, formatted_body=self.html)
        return content


def compose(*, text: str | None = None, html: str | None = None, markdown: str | None = None,
            msgtype: str = "text") -> Text:
    """Build a message from what a platform gives: text, HTML or markdown (text stays the body).

    HTML is sanitised; markdown is rendered and sanitised; without ``text`` the body is the
    HTML's text (or the markdown source). Formatting that says no more than the text is dropped.
    """
    if msgtype not in MSGTYPES:
        raise InvalidParam(f"msgtype must be one of {', '.join(MSGTYPES)}, got {msgtype!r}")
    if html is not None and markdown is not None:
        raise InvalidParam("give either html or markdown, not both")
    formatted = None
    if markdown is not None:
        formatted = markdown_to_html(markdown)
        body = text if text else markdown
    elif html is not None:
        formatted = sanitize(html)
        body = text if text else html_to_text(formatted)
    elif text:
        body = text
    else:
        raise InvalidParam("a message needs text, html or markdown")
    if not body.strip():
        raise InvalidParam("the message has no text left once its HTML is cleaned")
    if formatted is not None and _says_no_more(formatted, body):
        formatted = None
    return Text(body=body, html=formatted, msgtype=MSGTYPES[msgtype])


def _says_no_more(formatted: str, body: str) -> bool:
    plain = formatted.removeprefix("<p>").removesuffix("</p>")
    return plain == html_lib.escape(body, quote=False)
