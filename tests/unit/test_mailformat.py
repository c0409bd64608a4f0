"""The mail written directly (onboarding/mailformat.py) against Python's email package:
whatever the subject, body or address, the message parses back to what was given, or
is left to the email package (which then writes it, as before)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tenantry.onboarding.mail import message_id
from tenantry.onboarding.mailformat import Composer, unstructured

SENDER = "Tenantry <no-reply@tenantry.test>"
NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
KEY = "onboarding-42-welcome"
TEXT = "Hello,\n\nthe workspace of {name} has been set up, and you are its owner.\n\n-- Tenantry\n"


def parse(data: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


def render(
    subject: str, text: str = "Hello\n", to: str = "alice@example.test", linesep: str = "\r\n"
) -> bytes | None:
    return Composer(SENDER).render(to, subject, text, message_id(KEY), NOW, linesep=linesep)


def check_lines(data: bytes, linesep: bytes) -> None:
    """Every line ends with `linesep`; header lines holding encoded-words are at most
    76 characters (RFC 2047), the others at most 78 unless one word is longer, and no
    line passes 998 octets (RFC 5322)."""
    assert data.endswith(linesep)
    other = b"\r" if linesep == b"\n" else b"\n"
    assert other not in data.replace(linesep, b"")
    head, _, _ = data.partition(linesep + linesep)
    for line in head.split(linesep):
        if b"=?utf-8?b?" in line:
            assert len(line) <= 76, line
        elif b" " in line.strip():
            assert len(line) <= 78 or len(max(line.split(b" "), key=len)) > 60, line
    assert all(len(line) <= 998 for line in data.split(linesep))


@pytest.mark.parametrize(
    "name",
    [
        "Acme",
        "Société Générale",
        "東京 合同会社",
        "Ünïcødé and a name long enough to need the subject folded somewhere",
        "=?utf-8?q?forged?=",  # plain text that looks like an encoded-word stays text
        "Acme ?= =? Co",
        "naïve  spaces",
        "emoji 🚀 launch",
    ],
)
@pytest.mark.parametrize("linesep", ["\r\n", "\n"])
def test_the_welcome_mail_is_written_directly_and_parses_back(name: str, linesep: str) -> None:
    subject = f"Welcome to Tenantry: {name} is ready"
    text = TEXT.format(name=name)

    data = render(subject, text, linesep=linesep)

    # The welcome mail never needs the email package (that is the point: it costs
    # 0.4-0.8 ms a message).
    assert data is not None
    check_lines(data, linesep.encode())
    message = parse(data)
    assert message["From"] == SENDER
    assert message["To"] == "alice@example.test"
    assert message["Subject"] == subject
    assert message["Date"] == format_datetime(NOW)
    assert message["Message-ID"] == message_id(KEY)
    assert message.get_content_type() == "text/plain"
    assert message.get_content_charset() == "utf-8"
    assert message["Content-Transfer-Encoding"] == ("7bit" if text.isascii() else "8bit")
    assert message.get_content().replace("\r\n", "\n") == text
    assert not message.defects
    for header in ("Subject", "From", "To"):
        assert not message[header].defects, header
    if not name.isascii():
        assert name.encode() not in data.partition(linesep.encode() * 2)[0]  # RFC 2047


def test_plain_text_that_looks_like_an_encoded_word_is_encoded() -> None:
    # Otherwise a reader would show "forged" where the tenant wrote the whole thing.
    line = unstructured("Subject", "Welcome =?utf-8?q?forged?= now")
    assert line is not None
    assert "=?utf-8?q?forged?=" not in line
    assert line.startswith("Subject: Welcome =?utf-8?b?")
    assert line.endswith("?= now")


@pytest.mark.parametrize("field", ["subject", "to"])
@pytest.mark.parametrize(
    "breaker", ["\r\n", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"]
)
def test_a_line_break_in_a_header_is_refused_as_the_email_package_refuses_it(
    field: str, breaker: str
) -> None:
    value = f"Acme{breaker}Bcc: eve@example.test"
    stdlib = EmailMessage()
    with pytest.raises(ValueError):
        stdlib["Subject"] = value
    with pytest.raises(ValueError):
        if field == "subject":
            render(value)
        else:
            render("Welcome", to=f"alice@example.test{breaker}Bcc: eve@example.test")


@pytest.mark.parametrize(
    ("subject", "text", "to"),
    [
        ("Tab\there", "Hello\n", "alice@example.test"),  # control characters
        ("Welcome", "Hello\x00\n", "alice@example.test"),
        ("Welcome", "x" * 999 + "\n", "alice@example.test"),  # too long for 8bit
        (" leading space", "Hello\n", "alice@example.test"),
        ("Welcome", "Hello\n", '"quoted local"@example.test'),
        ("Welcome", "Hello\n", "jürgen@example.test"),  # RFC 6532: the email package's
        ("Welcome", "Hello\n", "alice@example.test, eve@example.test"),
        ("Welcome", "Hello\n", "Alice <alice@example.test>"),
        ("x" * 1000, "Hello\n", "alice@example.test"),
        ("zero\u200bwidth", "Hello\n", "alice@example.test"),
    ],
)
def test_what_the_direct_path_does_not_cover_is_left_to_the_email_package(
    subject: str, text: str, to: str
) -> None:
    assert render(subject, text, to=to) is None


def test_a_body_line_of_998_octets_is_written_directly() -> None:
    data = render("Welcome", "é" * 499 + "\n")  # 998 octets
    assert data is not None
    assert parse(data).get_content() == "é" * 499 + "\r\n"


# Words a subject is made of: spaces (runs of them too), plain ASCII, text that looks
# like RFC 2047 syntax, any printable character outside ASCII, and now and then any
# character at all (which the email package gets, or refuses as it always did).
_printable = st.characters(exclude_categories=("Cc", "Cs", "Cf", "Co", "Cn", "Zl", "Zp"))
_pieces = st.sampled_from(
    [" ", "  ", "a", "Acme", "=?", "?=", "=?utf-8?b?QQ==?=", "é", "東京", "🚀", ":", '"', "("]
)
_subjects = st.lists(
    _pieces | st.text(_printable, min_size=1, max_size=8) | st.text(min_size=1, max_size=2),
    min_size=1,
    max_size=40,
).map("".join)
_bodies = st.lists(
    st.text(_printable, max_size=120) | st.sampled_from(["\n", "\r\n", "\r", "\t", "."]),
    max_size=30,
).map("".join)


@settings(max_examples=400, deadline=None)
@given(_subjects)
@example("a" * 70 + " é")
@example("é" * 100)
@example("Welcome  " + "🚀" * 30 + "  done")
def test_any_subject_parses_back_to_itself_or_is_left_to_the_email_package(
    subject: str,
) -> None:
    try:
        data = render(subject)
    except ValueError:
        # The email package refuses it too.
        with pytest.raises(ValueError):
            EmailMessage()["Subject"] = subject
        return
    if data is None:
        return
    check_lines(data, b"\r\n")
    message = parse(data)
    assert message["Subject"] == subject
    assert not message["Subject"].defects


@settings(max_examples=200, deadline=None)
@given(_bodies | st.text(max_size=300))
def test_any_body_parses_back_with_its_line_ends_made_crlf(text: str) -> None:
    data = render("Welcome", text)
    if data is None:
        return
    check_lines(data, b"\r\n")
    got = parse(data).get_content()
    # What the email package itself makes of the text: its lines, each ending in CRLF.
    want = "".join(line + "\r\n" for line in re.split(r"\r\n|\r|\n", text))
    if text == "" or text.endswith(("\r", "\n")):
        want = want[: -len("\r\n")] if text else "\r\n"
    assert got == want
