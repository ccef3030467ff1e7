import pytest

from herald.templates import TemplateProblem, compile_email, html_to_text, render_context


def _context(**contact: object) -> dict[str, object]:
    return render_context(
        email="ann@example.com",
        unsubscribe_url="https://h.example/unsubscribe/tok",
        template_vars={"promo": "SPRING"},
        **contact,  # type: ignore[arg-type]
    )


def test_personalisation_with_defaults_attributes_and_variables():
    compiled = compile_email(
        'Hi {{ contact.first_name | default("there") }}',
        "<p>{{ contact.attributes.plan }} {{ promo }} <a href='{{ unsubscribe_url }}'>x</a></p>",
        "Plan: {{ contact.attributes.plan }}",
    )
    subject, html, text = compiled.render(_context(first_name="Ann", attributes={"plan": "pro"}))
    assert subject == "Hi Ann"
    assert html == "<p>pro SPRING <a href='https://h.example/unsubscribe/tok'>x</a></p>"
    assert text == "Plan: pro"
    anonymous = compiled.render(_context())
    assert anonymous[0] == "Hi there"
    assert anonymous[1] is not None
    assert anonymous[1].startswith("<p> SPRING")


def test_html_escapes_values_but_text_and_subject_do_not():
    compiled = compile_email(
        "{{ contact.first_name }}", "<b>{{ contact.first_name }}</b>", "{{ contact.first_name }}"
    )
    subject, html, text = compiled.render(_context(first_name="<script>&"))
    assert html == "<b>&lt;script&gt;&amp;</b>"
    assert subject == text == "<script>&"


def test_subject_stays_on_one_line():
    subject, _, _ = compile_email("A {{ promo }}\nB", None, "t").render(_context())
    assert subject == "A SPRING B"


def test_a_template_that_does_not_parse_names_part_and_line():
    with pytest.raises(TemplateProblem) as caught:
        compile_email("ok", "<p>\nfine\n{{ contact.first_name </p>", None)
    assert caught.value.part == "html"
    assert caught.value.line == 3
    assert "line 3" in str(caught.value)


def test_the_sandbox_refuses_python_internals():
    compiled = compile_email(
        "{{ contact.__class__.__mro__ }}", None, "{{ ''.__class__.__subclasses__() }}"
    )
    with pytest.raises(TemplateProblem):
        compiled.render(_context())


def test_html_to_text_keeps_structure_and_link_targets():
    html = (
        "<html><head><style>p{}</style><title>T</title></head><body>"
        "<h1>Hello {{ contact.first_name }}</h1><p>Read   our <a href='https://x.io/a'>news</a>.</p>"
        "<ul><li>one</li><li>two</li></ul>Bye<br>now &amp; then</body></html>"
    )
    assert html_to_text(html) == (
        "Hello {{ contact.first_name }}\n\nRead our news (https://x.io/a).\n\n"
        "- one\n- two\n\nBye\nnow & then\n"
    )
