"""Message text both ways: sanitised HTML, rendered markdown, a plain body always."""

from __future__ import annotations

import pytest

from dmbridge.errors import InvalidParam
from dmbridge.formatting import compose, html_to_text, markdown_to_html, sanitize


@pytest.mark.parametrize(("dirty", "clean"), [
    ("<b>bold</b><script>alert(1)</script>", "<b>bold</b>"),
    ("<style>body{display:none}</style><i>x</i>", "<i>x</i>"),
    ('<p onclick="steal()" style="color:red">hi</p>', "<p>hi</p>"),
    ('<a href="javascript:alert(1)">link</a>', "<a>link</a>"),
    ('<a href="https://example.org" target="_top">ok</a>', '<a href="https://example.org">ok</a>'),
    ('<a href="https://example.org" target="_blank">ok</a>',
     '<a href="https://example.org" target="_blank">ok</a>'),
    ('<img src="https://tracker.example/p.png" alt="x">', '<img alt="x">'),
    ('<img src="mxc://example.org/abc" alt="x">', '<img src="mxc://example.org/abc" alt="x">'),
    ('<iframe src="https://evil"></iframe>text', "text"),
    ('<font color="red" data-mx-color="#ff00ff">c</font>',
     '<font data-mx-color="#ff00ff">c</font>'),
    ('<code class="language-python hljs">x</code>', '<code class="language-python">x</code>'),
    ('<span data-mx-spoiler="">secret</span>', '<span data-mx-spoiler="">secret</span>'),
    ("<table><tr><td>1</td></tr></table>", "<table><tbody><tr><td>1</td></tr></tbody></table>"),
    ("<unknown>kept text</unknown>", "kept text"),
])
def test_sanitize_keeps_what_matrix_clients_render(dirty: str, clean: str) -> None:
    assert sanitize(dirty) == clean


def test_markdown_renders_and_never_passes_raw_html() -> None:
    html = markdown_to_html("**bold** and `code`\n\n<script>alert(1)</script>")
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert markdown_to_html("[x](javascript:alert(1))") == "<p>[x](javascript:alert(1))</p>"
    assert "<s>gone</s>" in markdown_to_html("~~gone~~")


def test_html_to_text_keeps_lines_and_characters() -> None:
    assert html_to_text("<p>one &amp; two</p><p>three<br>four</p>") == "one & two\nthree\nfour"
    assert html_to_text("<script>x()</script>a &lt;b&gt;") == "a <b>"


def test_compose_builds_matrix_content() -> None:
    assert compose(text="plain").content() == {"msgtype": "m.text", "body": "plain"}
    assert compose(markdown="**hi**", msgtype="notice").content() == {
        "msgtype": "m.notice", "body": "**hi**", "format": "org.matrix.custom.html",
        "formatted_body": "<p><strong>hi</strong></p>",
    }
    emote = compose(text="waves", html="<i>waves</i>", msgtype="emote")
    assert (emote.msgtype, emote.body, emote.html) == ("m.emote", "waves", "<i>waves</i>")
    # Without text, the body is the cleaned HTML's text.
    assert compose(html="<b>Hi</b> <script>x</script>there").body == "Hi there"
    # Formatting that adds nothing to the text is left out.
    assert compose(markdown="just words").html is None
    assert compose(text="a < b", html="a &lt; b").html is None


@pytest.mark.parametrize(("kwargs", "mentions"), [
    ({}, "needs text, html or markdown"),
    ({"text": ""}, "needs text, html or markdown"),
    ({"html": "<script>only()</script>"}, "no text left"),
    ({"html": "<b>a</b>", "markdown": "**a**"}, "either html or markdown"),
    ({"text": "x", "msgtype": "m.text"}, "msgtype must be one of"),
])
def test_compose_refuses_what_cannot_be_a_message(kwargs: dict[str, str], mentions: str) -> None:
    with pytest.raises(InvalidParam, match=mentions):
        compose(**kwargs)
