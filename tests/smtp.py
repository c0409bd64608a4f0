"""A real SMTP server on loopback (aiosmtpd) for the tests: it keeps what arrives and
refuses the special addresses below, as a mail server would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

NO_SUCH_USER = "ghost@example.test"  # 550: permanent
TRY_LATER = "busy@example.test"  # 451: transient
TOO_BIG = "big@example.test"  # 552 on DATA
USER = "mailer"
# Every character here needs percent-encoding in a URL.
PASSWORD = "hunter2/p@ss:w#rd?"


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    authenticated: bool

    def parsed(self) -> EmailMessage:
        message = BytesParser(policy=policy.default).parsebytes(self.content)
        assert isinstance(message, EmailMessage)
        return message


class Recorder:
    """aiosmtpd handler: keeps what arrives, refuses the special addresses."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.arrived = asyncio.Event()
        self.logins: list[tuple[str, str]] = []

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address == NO_SUCH_USER:
            return "550 5.1.1 no such user"
        if address == TRY_LATER:
            return "451 4.3.0 try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if TOO_BIG in envelope.rcpt_tos:
            return "552 5.3.4 message too big"
        content = envelope.original_content
        assert isinstance(content, bytes)
        assert envelope.mail_from is not None
        self.received.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                content,
                bool(session.authenticated),
            )
        )
        self.arrived.set()
        return "250 Message accepted for delivery"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        self.logins.append((login, password))
        return AuthResult(success=(login, password) == (USER, PASSWORD), handled=False)

    async def one_message(self) -> Received:
        await asyncio.wait_for(self.arrived.wait(), timeout=10)
        assert len(self.received) == 1
        return self.received[0]


@dataclass(frozen=True)
class Server:
    recorder: Recorder
    port: int

    def url(self, userinfo: str = "") -> str:
        return f"smtp://{userinfo}127.0.0.1:{self.port}"


@pytest.fixture
async def smtp_server() -> AsyncIterator[Server]:
    recorder = Recorder()
    loop = asyncio.get_running_loop()

    def protocol() -> SMTP:
        return SMTP(
            recorder,
            hostname="mx.test",
            authenticator=recorder.authenticate,
            # No TLS in this test server, and AUTH must still be offered.
            auth_require_tls=False,
            loop=loop,
        )

    server = await loop.create_server(protocol, host="127.0.0.1", port=0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Server(recorder, port)
    finally:
        server.close()
        await server.wait_closed()
