"""Mail delivery against a real SMTP server (aiosmtpd on this loop) and to files on disk."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import stat
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime
from pathlib import Path
from urllib.parse import quote

import pytest
import structlog

from tenantry.onboarding.mail import (
    FileMailer,
    Mail,
    MailRejected,
    MailUnavailable,
    SmtpMailer,
    mailer_for,
    message_id,
    parse_smtp_url,
)
from tests.smtp import NO_SUCH_USER, PASSWORD, TOO_BIG, TRY_LATER, USER, Server

SENDER = "noreply@tenantry.test"
NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


class FixedClock:
    def __init__(self, now: datetime = NOW) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current

    def monotonic(self) -> float:
        return 0.0


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port held by a socket that is bound but not listening: connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def welcome(to: str = "alice@example.test", key: str = "onboarding:42:welcome") -> Mail:
    return Mail(
        key=key,
        to=to,
        subject="Welcome to Tenantry",
        text="Hello Alice,\n\nyour tenant is ready.\n",
    )


# --- SMTP -------------------------------------------------------------------------------


async def test_smtp_delivers_headers_body_and_deterministic_message_id(
    smtp_server: Server,
) -> None:
    mailer = SmtpMailer(smtp_server.url(), SENDER, clock=FixedClock())
    mail = welcome()

    await mailer.send(mail)

    got = await smtp_server.recorder.one_message()
    assert got.mail_from == SENDER
    assert got.rcpt_tos == ["alice@example.test"]
    assert not got.authenticated
    message = got.parsed()
    assert message["From"] == SENDER
    assert message["To"] == "alice@example.test"
    assert message["Subject"] == "Welcome to Tenantry"
    assert message["Date"] == format_datetime(NOW)
    expected_id = f"<{hashlib.sha256(b'onboarding:42:welcome').hexdigest()[:32]}@tenantry>"
    assert message["Message-ID"] == expected_id
    # SMTP carries lines ending in CRLF.
    assert message.get_content().replace("\r\n", "\n") == mail.text


@pytest.mark.parametrize("name", ["Acme", "Société Générale 東京"])
async def test_smtp_sends_the_bytes_written_directly_and_dot_stuffs_them(
    smtp_server: Server, name: str
) -> None:
    # The message's bytes come from mailformat, not the email package; lines that
    # start with a dot survive the DATA phase (aiosmtplib stuffs, the server unstuffs).
    mailer = SmtpMailer(smtp_server.url(), SENDER, clock=FixedClock())
    mail = Mail(
        key="onboarding:42:welcome",
        to="alice@example.test",
        subject=f"Welcome to Tenantry: {name} is ready",
        text=f"Hello,\n.\n..two dots\n.{name}\n",
    )

    await mailer.send(mail)

    got = await smtp_server.recorder.one_message()
    expected = FileMailer(Path("unused"), SENDER, clock=FixedClock()).render(mail)
    assert got.content == expected.replace(b"\n", b"\r\n")
    assert (got.mail_from, got.rcpt_tos) == (SENDER, ["alice@example.test"])
    message = got.parsed()
    assert message["Subject"] == mail.subject
    assert message["Message-ID"] == message_id(mail.key)
    assert message.get_content().replace("\r\n", "\n") == mail.text
    assert message["Content-Transfer-Encoding"] == ("7bit" if name.isascii() else "8bit")


async def test_smtp_leaves_what_the_direct_path_does_not_cover_to_the_email_package(
    smtp_server: Server,
) -> None:
    mailer = SmtpMailer(smtp_server.url(), SENDER, clock=FixedClock())
    mail = welcome(to='"alice smith"@example.test')

    await mailer.send(mail)

    got = await smtp_server.recorder.one_message()
    assert got.rcpt_tos == ['"alice smith"@example.test']
    message = got.parsed()
    assert message["To"].addresses[0].addr_spec == '"alice smith"@example.test'
    assert message["Subject"] == mail.subject


async def test_smtp_refuses_header_injection_before_connecting(refused_port: int) -> None:
    # Nothing listens there: a connection attempt would be a MailUnavailable.
    mailer = SmtpMailer(f"smtp://127.0.0.1:{refused_port}", SENDER)

    for bad in (
        welcome(to="alice@example.test\r\nBcc: eve@example.test"),
        Mail(key="k", to="alice@example.test", subject="Hi\nBcc: eve@example.test", text="x"),
    ):
        with pytest.raises(ValueError):
            await mailer.send(bad)


async def test_smtp_resend_of_a_key_carries_the_same_message_id(smtp_server: Server) -> None:
    # An at-least-once resend does reach the server again; the shared Message-ID is what
    # lets the receiver drop it.
    mailer = SmtpMailer(smtp_server.url(), SENDER, clock=FixedClock())
    await mailer.send(welcome())
    await mailer.send(welcome())
    await mailer.send(welcome(key="onboarding:43:welcome"))

    ids = [got.parsed()["Message-ID"] for got in smtp_server.recorder.received]
    assert ids[0] == ids[1] == message_id("onboarding:42:welcome")
    assert ids[2] != ids[0]


async def test_smtp_auth_with_percent_encoded_password(smtp_server: Server) -> None:
    userinfo = f"{USER}:{quote(PASSWORD, safe='')}@"
    mailer = SmtpMailer(smtp_server.url(userinfo), SENDER)

    await mailer.send(welcome())

    got = await smtp_server.recorder.one_message()
    assert got.authenticated
    assert smtp_server.recorder.logins == [(USER, PASSWORD)]
    assert "hunter2" not in mailer.describe()
    assert mailer.describe() == f"smtp://127.0.0.1:{smtp_server.port} (starttls if offered, auth)"


async def test_smtp_wrong_password_is_transient_and_never_shown(smtp_server: Server) -> None:
    wrong = "hunter2-wrong"
    mailer = SmtpMailer(smtp_server.url(f"{USER}:{wrong}@"), SENDER)

    with structlog.testing.capture_logs() as logs, pytest.raises(MailUnavailable) as caught:
        await mailer.send(welcome())

    assert caught.value.code == 535
    # aiosmtplib tries each mechanism the server offers before giving up.
    assert smtp_server.recorder.logins
    assert set(smtp_server.recorder.logins) == {(USER, wrong)}
    assert smtp_server.recorder.received == []
    shown = "".join(traceback.format_exception(caught.value)) + repr(logs)
    assert "hunter2" not in shown
    assert [entry["event"] for entry in logs] == ["mail_unavailable"]


async def test_smtp_550_recipient_is_rejected_permanently(smtp_server: Server) -> None:
    mailer = SmtpMailer(smtp_server.url(), SENDER)

    with pytest.raises(MailRejected) as caught:
        await mailer.send(welcome(to=NO_SUCH_USER))

    assert caught.value.code == 550
    assert "no such user" in caught.value.message
    assert smtp_server.recorder.received == []


async def test_smtp_552_on_data_is_rejected_permanently(smtp_server: Server) -> None:
    mailer = SmtpMailer(smtp_server.url(), SENDER)

    with pytest.raises(MailRejected) as caught:
        await mailer.send(welcome(to=TOO_BIG))

    assert caught.value.code == 552
    assert "too big" in caught.value.message


async def test_smtp_451_recipient_is_transient(smtp_server: Server) -> None:
    mailer = SmtpMailer(smtp_server.url(), SENDER)

    with pytest.raises(MailUnavailable) as caught:
        await mailer.send(welcome(to=TRY_LATER))

    assert not isinstance(caught.value, MailRejected)
    assert caught.value.code == 451
    assert "try later" in str(caught.value)
    assert smtp_server.recorder.received == []


async def test_smtp_connection_refused_is_transient(refused_port: int) -> None:
    mailer = SmtpMailer(f"smtp://127.0.0.1:{refused_port}", SENDER, timeout=5)

    with pytest.raises(MailUnavailable) as caught:
        await mailer.send(welcome())

    assert not isinstance(caught.value, MailRejected)
    assert isinstance(caught.value.__cause__, OSError)


async def test_smtp_silent_server_times_out_as_transient() -> None:
    release = asyncio.Event()

    async def never_greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    server = await asyncio.start_server(never_greet, host="127.0.0.1", port=0)
    port = server.sockets[0].getsockname()[1]
    try:
        mailer = SmtpMailer(f"smtp://127.0.0.1:{port}", SENDER, timeout=0.2)
        with pytest.raises(MailUnavailable) as caught:
            await mailer.send(welcome())
        assert isinstance(caught.value.__cause__, TimeoutError)
    finally:
        release.set()
        server.close()
        await server.wait_closed()


# --- files ------------------------------------------------------------------------------


async def test_file_mailer_writes_once_per_key(tmp_path: Path) -> None:
    directory = tmp_path / "spool" / "mail"
    clock = FixedClock()
    mailer = FileMailer(directory, SENDER, clock=clock)
    mail = welcome()

    await mailer.send(mail)

    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = os.listdir(directory)
    assert len(files) == 1
    assert files[0].endswith(".eml")
    path = directory / files[0]
    assert path == mailer.path_for(mail.key)
    first = path.read_bytes()
    before = path.stat()
    message = BytesParser(policy=policy.default).parsebytes(first)
    assert isinstance(message, EmailMessage)
    assert message["From"] == SENDER
    assert message["To"] == mail.to
    assert message["Subject"] == mail.subject
    assert message["Date"] == format_datetime(NOW)
    assert message["Message-ID"] == message_id(mail.key)
    assert message.get_content() == mail.text

    # A retry after a crash: same key, and even a different body and time, must not
    # produce a second mail or touch the first.
    clock.current = NOW + timedelta(hours=1)
    await mailer.send(Mail(key=mail.key, to=mail.to, subject="Changed", text="changed"))

    assert os.listdir(directory) == files  # no second file, no leftover temp file
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert path.read_bytes() == first


async def test_file_mailer_names_stay_inside_and_apart(tmp_path: Path) -> None:
    directory = tmp_path / "mail"
    mailer = FileMailer(directory, SENDER)

    for key in ("../../escape", "a/b", "a_b", "...", "onboarding:42:welcome"):
        await mailer.send(welcome(key=key))

    assert os.listdir(tmp_path) == [directory.name]
    names = os.listdir(directory)
    assert len(names) == 5
    assert all(name.endswith(".eml") and not name.startswith(".") for name in names)


async def test_file_mailer_refuses_header_injection(tmp_path: Path) -> None:
    mailer = FileMailer(tmp_path / "mail", SENDER)

    with pytest.raises(ValueError):
        await mailer.send(welcome(to="alice@example.test\r\nBcc: eve@example.test"))

    assert not (tmp_path / "mail").exists()


@pytest.mark.parametrize(
    "name", ["Société Générale", "東京 🚀", "=?utf-8?q?forged?= Co", "Acme\u2028Bcc: eve@x.test"]
)
async def test_file_mailer_writes_a_name_in_the_subject_as_given_or_refuses_it(
    tmp_path: Path, name: str
) -> None:
    # The welcome mail's subject carries the tenant's name: written directly (not by
    # the email package, see mailformat), it still reads back as given, encoded per
    # RFC 2047 when it is not plain ASCII; a line break in it is refused before anything
    # is written, as before.
    directory = tmp_path / "mail"
    mailer = FileMailer(directory, SENDER, clock=FixedClock())
    mail = Mail(
        key="onboarding:42:welcome",
        to="alice@example.test",
        subject=f"Welcome to Tenantry: {name} is ready",
        text=f"Hello,\n\nthe workspace of {name} has been set up.\n",
    )

    if "\u2028" in name:
        with pytest.raises(ValueError):
            await mailer.send(mail)
        assert not directory.exists()
        return
    await mailer.send(mail)

    data = mailer.path_for(mail.key).read_bytes()
    assert data == mailer.render(mail)  # the direct path, not the email package's
    head = data.partition(b"\n\n")[0]
    assert b"\r" not in data
    assert name.encode() not in head
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    assert message["Subject"] == mail.subject
    assert message["To"] == mail.to
    assert message["From"] == SENDER
    assert message["Message-ID"] == message_id(mail.key)
    assert message["Date"] == format_datetime(NOW)
    assert message.get_content() == mail.text
    assert not message.defects and not message["Subject"].defects


async def test_file_mailer_leaves_an_address_it_does_not_write_to_the_email_package(
    tmp_path: Path,
) -> None:
    mailer = FileMailer(tmp_path / "mail", SENDER, clock=FixedClock())
    mail = welcome(to='"alice smith"@example.test')

    await mailer.send(mail)

    message = BytesParser(policy=policy.default).parsebytes(mailer.path_for(mail.key).read_bytes())
    assert message["To"].addresses[0].addr_spec == '"alice smith"@example.test'
    assert message["Subject"] == mail.subject


# --- settings ---------------------------------------------------------------------------


def test_parse_smtp_url_forms() -> None:
    plain = parse_smtp_url("smtp://mail.example.com")
    assert (plain.host, plain.port, plain.implicit_tls, plain.starttls) == (
        "mail.example.com",
        25,
        False,
        None,
    )
    assert plain.username is None
    assert plain.password is None

    required = parse_smtp_url("smtp://mail.example.com:587?starttls=true")
    assert (required.port, required.starttls) == (587, True)
    assert required.describe() == "smtp://mail.example.com:587 (starttls)"
    assert parse_smtp_url("smtp://mail.example.com?starttls=false").starttls is False

    tls = parse_smtp_url(f"smtps://{USER}:{quote(PASSWORD, safe='')}@mail.example.com")
    assert (tls.port, tls.implicit_tls, tls.starttls) == (465, True, None)
    assert (tls.username, tls.password) == (USER, PASSWORD)
    assert tls.describe() == "smtps://mail.example.com:465 (tls, auth)"
    assert "hunter2" not in repr(tls)

    v6 = parse_smtp_url("smtp://[::1]:2525")
    assert v6.describe() == "smtp://[::1]:2525 (starttls if offered)"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://mail.example.com", "smtp:// or smtps://"),
        ("mail.example.com:25", "smtp:// or smtps://"),
        ("smtp://", "no host"),
        ("smtp://user:hunter2@", "no host"),
        ("smtp://mail.example.com:abc", "port"),
        ("smtp://mail.example.com:70000", "port"),
        ("smtp://mail.example.com:0", "port"),
        ("smtp://[::1", "malformed"),
        ("smtp://mail.example.com/relay", "after the host"),
        ("smtp://mail.example.com?starttls=maybe", "true or false"),
        ("smtp://mail.example.com?tls=true", "unknown option"),
        ("smtps://mail.example.com?starttls=true", "smtp:// only"),
        ("smtp://user@mail.example.com", "no password"),
        ("smtp://:hunter2@mail.example.com", "no user"),
        # Mistyped passwords that spill into the port, path, query or fragment.
        ("smtp://user:hunter2/x@mail.example.com", "port"),
        ("smtp://user:hunter2#x@mail.example.com", "port"),
        ("smtp://user:25?hunter2@mail.example.com", "unknown option"),
        ("smtp://user:hunter2@mail.example.com:99999", "port"),
        ("ftp://user:hunter2@mail.example.com", "smtp:// or smtps://"),
    ],
)
def test_parse_smtp_url_errors_name_the_fault_but_not_the_password(url: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_smtp_url(url)

    assert says in str(caught.value)
    # Also the chained urllib errors, which would quote the bad port in a traceback.
    assert "hunter2" not in "".join(traceback.format_exception(caught.value))


def test_mailer_for_picks_smtp_only_when_a_url_is_set(tmp_path: Path) -> None:
    files = mailer_for(None, tmp_path, SENDER)
    assert isinstance(files, FileMailer)
    assert files.describe() == f"files in {tmp_path}"
    assert isinstance(mailer_for("", tmp_path, SENDER), FileMailer)

    smtp = mailer_for(f"smtp://{USER}:hunter2@mail.example.com:587", tmp_path, SENDER)
    assert isinstance(smtp, SmtpMailer)
    assert smtp.describe() == "smtp://mail.example.com:587 (starttls if offered, auth)"

    with pytest.raises(ValueError, match="port"):
        mailer_for("smtp://mail.example.com:nope", tmp_path, SENDER)
