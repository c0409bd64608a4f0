"""The bytes of an outgoing mail, written directly instead of through Python's `email`
package.

Building an `EmailMessage` and flattening it parses every header into the header
registry's objects and refolds it on the way out: 0.4-0.8 ms of CPU per message, about a
fifth of the service's CPU while it provisions sign-ups.  The mails Tenantry sends are
simple (one plain-text UTF-8 part, one recipient, a subject), and their bytes can be
written in a few microseconds:

- `To`: an ASCII addr-spec made of dot-atoms, as is (RFC 5322 3.4.1).
- `Subject`: printable ASCII as is, folded at spaces; a run of words holding anything
  else (non-ASCII, or text an RFC 2047 decoder would take for an encoded-word) as UTF-8
  base64 encoded-words (RFC 2047) of at most 75 characters, each whole characters.
- the body: 7bit when ASCII, else 8bit, lines as the email package ends them (`\\r\\n`,
  `\\r` or `\\n` all become one line end), ending with a line end.

Anything else (an address with a quoted local part or outside ASCII, control
characters, a line longer than the 998 octets a 7bit/8bit body may carry) goes through
the email package as before (`None` from `render`), so every mail is a conformant
message either way.  A line break in a header raises ValueError, as the email package
does: it would let a value add headers of its own.
"""

from __future__ import annotations

import base64
import email.utils
import re
from datetime import datetime
from email import policy
from email.message import EmailMessage

# RFC 5322 atext (ASCII), dot-atoms on both sides of the @.  "=?" is left to the email
# package: its parser decodes what looks like an encoded-word even inside an address.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR_SPEC = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*")
# Control characters other than the line ends, in a header or the body: rare enough to
# leave to the email package.  (Tabs count: unfolding and decoders treat them apart.)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f-\x9f]")
_HEADER_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Header lines that hold encoded-words stay within 76 characters (RFC 2047 2); the
# others are folded at 78 where a space allows (RFC 5322 2.1.1).
_LINE = 76
# 52 base64 characters: `=?utf-8?b?...?=` is 64 long, so it fits a line after
# "Subject: " (73) as well as on a folded line of its own.
_ENCODED_WORD_BYTES = 39
_BODY_LINE_MAX = 998  # octets, without the line end (RFC 5322 2.1.1, RFC 2045 2.8)
_LONGEST_HEADER = 900  # longer values are left to the email package's folding


def check_header(value: str) -> None:
    """Refuse a value that would start a line of its own, by the email package's rule
    (its lines are str.splitlines's, so \\v, \\f, \\x1c-\\x1e, \\x85, U+2028 and U+2029
    count as well as CR and LF).  A line end at the very end passes that rule; it is a
    control character, and so the email package's to write."""
    if len(value.splitlines()) > 1:
        raise ValueError("Header values may not contain linefeed or carriage return characters")


def _plain(word: str) -> bool:
    """A word a reader shows as it is: printable ASCII that no decoder takes for an
    encoded-word."""
    return word.isascii() and "=?" not in word and word.isprintable()


def _encoded_words(text: str) -> list[str]:
    """`text` as RFC 2047 B encoded-words, each at most 75 characters and each holding
    whole characters (a decoder decodes each word on its own)."""
    words: list[str] = []
    chunk = bytearray()
    for char in text:
        raw = char.encode("utf-8")
        if len(chunk) + len(raw) > _ENCODED_WORD_BYTES:
            words.append(f"=?utf-8?b?{base64.b64encode(chunk).decode('ascii')}?=")
            chunk.clear()
        chunk += raw
    if chunk:
        words.append(f"=?utf-8?b?{base64.b64encode(chunk).decode('ascii')}?=")
    return words


def unstructured(name: str, value: str) -> str | None:
    """`Name: value` for an unstructured header (RFC 5322 3.6.5), folded, with CRLF
    line ends and no final line end; None when the email package should write it."""
    check_header(value)
    if (
        len(value) > _LONGEST_HEADER
        or _HEADER_CONTROL.search(value)
        or value != value.strip(" ")
        or not value.isprintable()
    ):
        return None
    words = value.split(" ")
    # The value is its tokens joined by one space each.  The words from the first that
    # is not plain to the last become one run of encoded-words (the spaces between
    # them encoded inside): a decoder drops the space between two encoded-words (RFC
    # 2047 6.2) and keeps the one between an encoded-word and plain text.
    odd = [i for i, word in enumerate(words) if not _plain(word)]
    if odd:
        first, last = odd[0], odd[-1]
        encoded = _encoded_words(" ".join(words[first : last + 1]))
        tokens = words[:first] + encoded + words[last + 1 :]
    else:
        tokens = words
    lines: list[str] = []
    line = f"{name}:"
    limit = _LINE if odd else 78
    for token in tokens:
        # A fold goes before the space, which stays on the next line: unfolding (removing
        # the CRLF) gives the value back.  Never before an empty word (two spaces in a
        # row): the next line would start with nothing but space.
        if token and len(line) + 1 + len(token) > limit and line != f"{name}:":
            lines.append(line)
            line = f" {token}"
        else:
            line = f"{line} {token}"
    lines.append(line)
    return "\r\n".join(lines)


def body(text: str, *, linesep: bytes) -> tuple[bytes, str] | None:
    """The body's bytes and its Content-Transfer-Encoding, or None when the email
    package should encode it (control characters, a line too long for 7bit/8bit)."""
    if _CONTROL.search(text):
        return None
    data = text.encode("utf-8")
    lines = data.splitlines()
    if any(len(line) > _BODY_LINE_MAX for line in lines):
        return None
    return linesep.join(lines) + linesep, "7bit" if data.isascii() else "8bit"


class Composer:
    """Writes the mails of one sender.  Its From header is written once, by the email
    package (any sender the configuration allows, display name encoded as needed)."""

    def __init__(self, sender: str) -> None:
        message = EmailMessage(policy=policy.SMTP)
        message["From"] = sender  # raises ValueError for a sender with a line break
        self.sender = sender
        self._from = message.as_bytes().split(b"\r\n\r\n", 1)[0].decode("ascii")
        # SMTP's MAIL FROM, as aiosmtplib takes it from the header; None when it is
        # not one ASCII address (SMTPUTF8 is then send_message's to negotiate).
        addresses = message["From"].addresses
        spec = addresses[0].addr_spec if len(addresses) == 1 else ""
        self.envelope_sender = spec if spec and spec.isascii() else None

    def render(
        self, to: str, subject: str, text: str, message_id: str, when: datetime, *, linesep: str
    ) -> bytes | None:
        """The message with lines ended by `linesep`, or None for the email package."""
        check_header(to)
        if not _ADDR_SPEC.fullmatch(to) or "=?" in to or len(to) > _LONGEST_HEADER:
            return None
        subject_line = unstructured("Subject", subject)
        if subject_line is None:
            return None
        sep = linesep.encode("ascii")
        encoded = body(text, linesep=sep)
        if encoded is None:
            return None
        data, cte = encoded
        head = "\r\n".join(
            (
                self._from,
                f"To: {to}",
                subject_line,
                f"Date: {email.utils.format_datetime(when)}",
                f"Message-ID: {message_id}",
                "MIME-Version: 1.0",
                'Content-Type: text/plain; charset="utf-8"',
                f"Content-Transfer-Encoding: {cte}",
                "",
                "",
            )
        )
        if linesep != "\r\n":
            head = head.replace("\r\n", linesep)
        return head.encode("ascii") + data
