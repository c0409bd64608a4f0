"""ATKMAIN (pass): the welcome mail over SMTP to a server that does not offer 8BITMIME
(the direct bytes are 8bit for a name outside ASCII: the email package's send_message
must re-encode them), with lines that need dot-stuffing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from tenantry.onboarding.mail import Mail, SmtpMailer
from tests.smtp import Recorder

SENDER = "Tenantry <noreply@tenantry.test>"


class No8BitMime(Recorder):
    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        session.host_name = hostname
        return [r for r in responses if "8BITMIME" not in r.upper()]


@pytest.fixture
async def plain_server() -> AsyncIterator[tuple[No8BitMime, int]]:
    recorder = No8BitMime()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(recorder, hostname="mx.test", loop=loop), host="127.0.0.1", port=0
    )
    try:
        yield recorder, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("name", ["Acme", "Société Générale 東京", "=?utf-8?b?QQ==?= Co"])
async def test_atkmain_welcome_mail_to_a_server_without_8bitmime(
    plain_server: tuple[No8BitMime, int], name: str
) -> None:
    recorder, port = plain_server
    text = f"Hello,\n.\n..two dots\n.{name}\n\nthe workspace of {name} is ready.\n"
    mail = Mail(
        key="k", to="alice@example.test", subject=f"Welcome to Tenantry: {name} is ready",
        text=text,
    )  # fmt: skip
    await SmtpMailer(f"smtp://127.0.0.1:{port}", SENDER).send(mail)
    got = await recorder.one_message()
    assert got.content.isascii(), "8bit data to a server that did not offer 8BITMIME"
    message = got.parsed()
    assert message["Subject"] == mail.subject
    assert message["To"] == mail.to
    assert message.get_content().replace("\r\n", "\n") == text
    assert not message.defects
