"""Outgoing mail: one `Mail` per idempotency key, to SMTP or, by default, to files on disk.

Delivery is at-least-once (a job may resend after a crash), so every message carries a
`Message-ID` derived from its key: receivers drop a resend as a duplicate, and the file
mailer never writes a key twice.

Failures come in two kinds, so the calling job knows whether to retry:

- `MailRejected`: permanent. The server answered MAIL, RCPT or DATA with a 5xx (or cannot
  carry this address at all). Sending the same message again cannot help.
- `MailUnavailable`: transient. Connection refused or lost, timeouts, TLS failures, 4xx
  replies, and any refusal before the message itself is offered (greeting, EHLO, STARTTLS,
  AUTH). The last group may be a 5xx, but it says the server or our configuration is
  wrong, not this message: retrying lets the mail go out once an operator fixes that,
  instead of dropping every email sent in the meantime.

A malformed `Mail` (e.g. a line break in a header) raises `ValueError` before anything is
sent: that is a bug in the caller, not a mail failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import aiosmtplib

from tenantry import logging as log
from tenantry.clock import Clock, SystemClock

from .mailformat import Composer


def masked(address: str) -> str:
    """An address as logs show it: enough to tell which, not the whole of it
    (`k***@example.com`).  Addresses are personal data; logs travel further."""
    local, at, domain = address.rpartition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"


@dataclass(frozen=True)
class Mail:
    key: str  # idempotency key: the same key is the same message
    to: str
    subject: str
    text: str


class MailRejected(Exception):
    """Permanent: the server refused the recipient or the message (an SMTP 5xx).

    Retrying cannot help. `code` is the server's reply code (None when the refusal was
    not a reply, e.g. an address this server cannot carry) and `message` its text.
    """

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(f"{code} {message}" if code is not None else message)
        self.code = code
        self.message = message


class MailUnavailable(Exception):
    """Transient: the mail could not be handed over now (network, timeout, 4xx, server setup).

    The original error is chained as `__cause__`. Retry later.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class Mailer(Protocol):
    async def send(self, mail: Mail) -> None: ...

    def describe(self) -> str: ...


def message_id(key: str) -> str:
    """The `Message-ID` for a key: the same key always gives the same id."""
    return f"<{hashlib.sha256(key.encode()).hexdigest()[:32]}@tenantry>"


def build_message(
    mail: Mail, sender: str, clock: Clock, when: datetime | None = None
) -> EmailMessage:
    """The message as Python's email package builds it: what SMTP sends, and the file
    mailer's fallback for what `mailformat` leaves to it."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = mail.to
    message["Subject"] = mail.subject
    message["Date"] = email.utils.format_datetime(clock.now() if when is None else when)
    message["Message-ID"] = message_id(mail.key)
    message.set_content(mail.text)
    return message


# --- files ------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _file_name(key: str) -> str:
    # The readable part is for people browsing the directory; the digest keeps keys that
    # read alike ("a/b", "a_b") apart and makes the name safe whatever the key holds.
    readable = _UNSAFE.sub("_", key).strip("_")[:80]
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{readable}-{digest}.eml" if readable else f"{digest}.eml"


def _write_once(directory: Path, path: Path, data: bytes) -> bool:
    """Write `path` atomically unless it exists. Returns whether this call wrote it."""
    if path.exists():
        return False
    # 0o700: these files can hold sign-in links meant only for the recipient.
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Dot-prefixed so a leftover from a crash is never taken for a mail.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        # Two racing writers of one key both land here; the later replace wins and there
        # is still exactly one file, so the reader sees one mail either way.
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename is only durable once the directory is: without this a crash could lose
    # a mail the job already recorded as sent.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


class FileMailer:
    """Writes each mail to `<directory>/<name from key>.eml`: the default, needing no server.

    Lines end in LF, as files on this system do (and as the email package's default
    policy writes them); SMTP sends them with CRLF."""

    def __init__(self, directory: Path, sender: str, *, clock: Clock | None = None) -> None:
        self._directory = directory
        self._sender = sender
        self._composer = Composer(sender)
        self._clock: Clock = clock or SystemClock()
        self._log = log.get("mail")

    def describe(self) -> str:
        return f"files in {self._directory}"

    def path_for(self, key: str) -> Path:
        return self._directory / _file_name(key)

    def render(self, mail: Mail) -> bytes:
        """The file's bytes: written directly (mailformat) when the mail allows it, else
        by the email package."""
        when = self._clock.now()
        data = self._composer.render(
            mail.to, mail.subject, mail.text, message_id(mail.key), when, linesep="\n"
        )
        if data is None:
            data = build_message(mail, self._sender, self._clock, when).as_bytes()
        return data

    async def send(self, mail: Mail) -> None:
        data = self.render(mail)
        path = self.path_for(mail.key)
        # fsync can take a while; keep it off the event loop.
        written = await asyncio.to_thread(_write_once, self._directory, path, data)
        if written:
            self._log.info("mail_written", path=str(path), to=masked(mail.to))
        else:
            self._log.info("mail_already_written", path=str(path), to=masked(mail.to))


# --- SMTP -------------------------------------------------------------------------------

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    implicit_tls: bool  # smtps://: TLS from the first byte
    # True: STARTTLS required; False: never; None: aiosmtplib's default, which upgrades
    # only if the server offers STARTTLS (so a stripped offer means plain text).
    starttls: bool | None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "smtps" if self.implicit_tls else "smtp"
        if self.implicit_tls:
            tls = "tls"
        elif self.starttls is None:
            tls = "starttls if offered"
        elif self.starttls:
            tls = "starttls"
        else:
            tls = "no tls"
        auth = ", auth" if self.username is not None else ""
        return f"{scheme}://{host}:{self.port} ({tls}{auth})"


_FORM = "smtp[s]://[user[:password]@]host[:port][?starttls=true|false]"
_ENCODE_HINT = "percent-encode '/', '?', '#', '@' and ':' in the user or password"


def parse_smtp_url(url: str) -> SmtpSettings:
    """Parse `smtp://` or `smtps://` settings; the ValueError names what is wrong.

    No error message quotes any part of the URL: a mistyped URL can put pieces of the
    password where the port, path or query would be.
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        # Only an unbalanced '[' or ']' gets here.
        raise ValueError(f"SMTP URL is malformed ({_ENCODE_HINT}); form: {_FORM}") from None
    try:
        raw_port = parts.port
    except ValueError:
        # urllib's own message quotes the bad port, which may be part of the password.
        raise ValueError(
            f"SMTP URL port must be a number from 1 to 65535 ({_ENCODE_HINT}); form: {_FORM}"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in ("smtp", "smtps"):
        raise ValueError(f"SMTP URL must start with smtp:// or smtps://; form: {_FORM}")
    if not parts.hostname:
        raise ValueError(f"SMTP URL has no host; form: {_FORM}")
    if raw_port == 0:
        raise ValueError(f"SMTP URL port must be a number from 1 to 65535; form: {_FORM}")
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"SMTP URL has text after the host ({_ENCODE_HINT}); form: {_FORM}")

    starttls: bool | None = None
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name != "starttls":
            raise ValueError("SMTP URL has an unknown option: the only one is starttls=true|false")
        if starttls is not None:
            raise ValueError("SMTP URL gives starttls more than once")
        if value.lower() in _TRUE:
            starttls = True
        elif value.lower() in _FALSE:
            starttls = False
        else:
            raise ValueError("SMTP URL option starttls must be true or false")
    implicit_tls = scheme == "smtps"
    if implicit_tls and starttls is not None:
        raise ValueError(
            "SMTP URL option starttls applies to smtp:// only; smtps:// is TLS already"
        )

    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if password is not None and not username:
        raise ValueError("SMTP URL has a password but no user")
    if username is not None and password is None:
        raise ValueError("SMTP URL has a user but no password")

    return SmtpSettings(
        host=parts.hostname,
        port=raw_port or (465 if implicit_tls else 25),
        implicit_tls=implicit_tls,
        starttls=starttls,
        username=username or None,
        password=password,
    )


def _refusal(exc: Exception) -> MailRejected | None:
    """The permanent refusal in an error raised while offering the message, if it is one."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        # One recipient per mail, so "all refused" is that one; if a mix ever appears,
        # any 4xx means a retry could still get through.
        codes = [refused.code for refused in exc.recipients]
        if exc.recipients and min(codes) >= 500:
            first = exc.recipients[0]
            return MailRejected(first.code, first.message)
        return None
    if isinstance(exc, aiosmtplib.SMTPHeloError):
        return None  # about the session, not this message
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 500:
        return MailRejected(exc.code, exc.message)
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        # Raised here when the address needs SMTPUTF8 and the server lacks it: this
        # server can never carry this message.
        return MailRejected(None, exc.message)
    return None


_TRANSIENT = (aiosmtplib.SMTPException, OSError, TimeoutError)


class SmtpMailer:
    """Hands each mail to an SMTP server over a fresh connection.

    `timeout` bounds each network step (connect, each command), in seconds.

    The message's bytes are written directly (mailformat) when the mail allows it and
    the server takes them as they are (ASCII addresses; 8BITMIME for a body outside
    ASCII); otherwise the email package builds the message and aiosmtplib's
    send_message negotiates SMTPUTF8 or re-encodes the body as 7bit.  aiosmtplib
    dot-stuffs either.
    """

    def __init__(
        self, url: str, sender: str, timeout: float = 10.0, *, clock: Clock | None = None
    ) -> None:
        self._settings = parse_smtp_url(url)
        self._sender = sender
        self._timeout = timeout
        self._clock: Clock = clock or SystemClock()
        self._composer = Composer(sender)
        self._log = log.get("mail")

    def describe(self) -> str:
        return self._settings.describe()

    async def send(self, mail: Mail) -> None:
        mid = message_id(mail.key)
        when = self._clock.now()
        # Before connecting: a malformed mail (ValueError) is the caller's bug and sends
        # nothing.
        data: bytes | None = None
        if self._composer.envelope_sender is not None:
            data = self._composer.render(
                mail.to, mail.subject, mail.text, mid, when, linesep="\r\n"
            )
        message = build_message(mail, self._sender, self._clock, when) if data is None else None
        settings = self._settings
        smtp = aiosmtplib.SMTP(
            hostname=settings.host,
            port=settings.port,
            username=settings.username,
            password=settings.password,
            use_tls=settings.implicit_tls,
            start_tls=settings.starttls,
            timeout=self._timeout,
        )
        try:
            try:
                # Connects, upgrades and logs in: a failure here is never about this message.
                await smtp.connect()
            except _TRANSIENT as exc:
                raise self._unavailable(mail, mid, exc) from exc
            try:
                await self._hand_over(smtp, mail, when, data, message)
            except _TRANSIENT as exc:
                rejected = _refusal(exc)
                if rejected is None:
                    raise self._unavailable(mail, mid, exc) from exc
                self._log.warning(
                    "mail_rejected",
                    to=masked(mail.to),
                    message_id=mid,
                    code=rejected.code,
                    reply=rejected.message,
                )
                raise rejected from exc
            # The server has taken the message: a failed goodbye must not turn into a
            # retry, which would send it twice.
            with contextlib.suppress(*_TRANSIENT):
                await smtp.quit()
        finally:
            smtp.close()
        self._log.info("mail_sent", to=masked(mail.to), message_id=mid, server=self.describe())

    async def _hand_over(
        self,
        smtp: aiosmtplib.SMTP,
        mail: Mail,
        when: datetime,
        data: bytes | None,
        message: EmailMessage | None,
    ) -> None:
        """MAIL, RCPT and DATA: `data` as it is when the server can take it, else the
        email package's `message` through send_message."""
        sender = self._composer.envelope_sender
        if data is not None and sender is not None and not data.isascii():
            # An 8bit body needs 8BITMIME, which the EHLO reply tells.  A server that
            # refuses EHLO gets HELO from send_message, and a 7bit body.
            if smtp.is_ehlo_or_helo_needed:
                with contextlib.suppress(aiosmtplib.SMTPHeloError):
                    await smtp.ehlo()
            if not smtp.supports_extension("8bitmime"):
                data = None
        if data is None or sender is None:
            if message is None:
                message = build_message(mail, self._sender, self._clock, when)
            await smtp.send_message(message)
            return
        options = ["BODY=8BITMIME"] if smtp.supports_extension("8bitmime") else []
        await smtp.sendmail(sender, [mail.to], data, mail_options=options)

    def _unavailable(self, mail: Mail, mid: str, exc: BaseException) -> MailUnavailable:
        code: int | None = None
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            code = exc.code
        elif isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
            code = exc.recipients[0].code
        # aiosmtplib's messages carry the server's reply or the socket error, never our
        # credentials; the URL itself is only ever shown through describe().
        detail = str(exc) or type(exc).__name__
        self._log.warning(
            "mail_unavailable",
            to=masked(mail.to),
            message_id=mid,
            server=self.describe(),
            code=code,
            error=detail,
        )
        return MailUnavailable(f"{self.describe()}: {detail}", code)


def mailer_for(smtp_url: str | None, mail_dir: Path, sender: str) -> Mailer:
    """SMTP when a URL is configured (an empty string counts as none), else files in `mail_dir`."""
    if smtp_url:
        return SmtpMailer(smtp_url, sender)
    return FileMailer(mail_dir, sender)
