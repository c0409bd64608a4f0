"""`python -m tests.acceptance.offline_tenantry run ...`: the real `tenantry` command,
except that the webhook address guard resolves no host name through DNS: every name is
this machine (127.0.0.1).

The contract fuzz registers webhook endpoints with whatever host names it makes up;
the real guard would send each to the machine's DNS resolver, hundreds of look-ups a
run to a server that is not ours.  Here they never leave the process, and since every
name is loopback (which the fuzz allows, as the embedded default does), a made-up URL
registers like a real one, so the fuzz reaches what follows a registration.  The
guard's own rules (which addresses are refused, literal addresses) are unchanged and
tested in tests/unit/test_webhook_units.py."""

from __future__ import annotations

from tenantry.cli import main
from tenantry.webhooks import guard


async def _every_name_is_loopback(host: str) -> list[str]:
    return ["127.0.0.1"]


if __name__ == "__main__":
    # Guard() takes the module's default lookup when it is built, after this.
    guard._system_lookup = _every_name_is_loopback
    raise SystemExit(main())
