"""Webhook delivery: claim due deliveries, sign them (Standard Webhooks), POST them with
a timeout through the address guard, classify the outcome, and record every attempt in
batches (tenantry.webhook_record_leaving_held, which also moves each endpoint's
circuit).  A result whose endpoint's row another transaction holds is kept, with that
endpoint's later results, and recorded once the row is free: the rest of the batch does
not wait for it.

A slow or dead endpoint cannot hold up the others: the claim gives an endpoint at most
`max_in_flight` deliveries at a time across every process (and no more than its rate
limit), so a hanging endpoint holds a few of this process's slots until its timeout,
never all of them.  A process that stops mid-attempt leaves its deliveries leased; the
rescue (webhook_rescue) puts them back after the lease, with the attempt on record.
"""

from __future__ import annotations

import math
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
import asyncpg
from anyio.abc import TaskStatus

from .. import __version__
from .. import logging as log
from ..clock import Clock, Random, SystemClock, system_random
from ..db import UNAVAILABLE, leaves_no_session_state
from ..safetext import safe_json, safe_text
from ..sql import queries_for
from ..supervise import Health
from . import secrets
from .deliveries import msg_id
from .guard import ForbiddenAddress, Guard, ip_literal
from .policy import DEFAULT_SCHEDULE, decide
from .secrets import SecretBox, SecretUnreadable
from .signing import signature_header

Q = queries_for(__file__)
USER_AGENT = f"Tenantry-Webhooks/{__version__}"
REDACTED = "[redacted]"
_RECORD_BATCH = 500
# Results left out of a record (their endpoint's row held elsewhere) are tried again
# after this pause, doubling up to the second, per endpoint: not with every record (each
# try waits up to 50 ms for the row, in webhook_record_leaving_held).
_LEFT_OUT_RETRY = 0.05
_LEFT_OUT_RETRY_MAX = 1.0


@dataclass(frozen=True)
class Breaker:
    """When an endpoint's circuit opens, and what follows (see webhook_record_leaving_held)."""

    failures: int = 10  # consecutive failed attempts
    ratio: float = 0.5  # or this share of the window's attempts failed...
    volume: int = 20  # ...out of at least this many
    window_seconds: float = 60.0
    cooldown_seconds: float = 30.0  # open -> one probe
    disable_after_seconds: float = 5 * 86_400.0  # failing without a success this long

    def as_json(self) -> dict[str, float]:
        return {
            "failures": self.failures,
            "ratio": self.ratio,
            "volume": self.volume,
            "window_s": self.window_seconds,
            "cooldown_s": self.cooldown_seconds,
            "disable_after_s": self.disable_after_seconds,
        }


@dataclass(frozen=True)
class DeliveryConfig:
    concurrency: int = 128  # attempts in flight in this process
    max_in_flight: int = 4  # per endpoint, across processes
    # per tenant, across processes: one tenant's many hanging endpoints hold this many
    # places at most
    tenant_in_flight: int = 16
    timeout: int = 15  # seconds, connect to the end of the response; per-endpoint override
    schedule: tuple[int, ...] = DEFAULT_SCHEDULE
    body_cap: int = 64 * 1024  # bytes of a request or response body kept on record
    poll_interval: float = 1.0
    lease_margin: int = 10  # a lease is the timeout plus this
    breaker: Breaker = field(default_factory=Breaker)


@dataclass(frozen=True, slots=True)
class _Claimed:
    tenant_id: uuid.UUID
    id: uuid.UUID
    endpoint_id: uuid.UUID
    event_type: str
    body: str
    attempts: int
    url: str
    headers: Mapping[str, str]
    secret: bytes
    previous_secret: bytes | None
    timeout: int
    schedule: tuple[int, ...] | None


@dataclass
class _Response:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    error_class: str | None = None
    error: str | None = None


class Deliverer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        box: SecretBox,
        guard: Guard,
        config: DeliveryConfig,
        *,
        owner: str,
        health: Health | None = None,
        clock: Clock | None = None,
        rnd: Random | None = None,
        on_attempt: Callable[[str, int | None, float], None] | None = None,
    ) -> None:
        self._pool = pool  # the worker's login: claims and records are cross-tenant
        # Told of each attempt: its result, status (None: no response), seconds.
        self._on_attempt = on_attempt
        self._box = box
        self._guard = guard
        self.config = config
        self._owner = owner
        self._health = health
        self._clock = clock or SystemClock()
        self._rnd = rnd or system_random()
        self._wake = anyio.Event()
        self._in_flight = 0
        # Places asked for by claims under way (the claim loop's, a record's): counted
        # with those in flight, so that two claims at once never exceed `concurrency`.
        self._reserved = 0
        # The claim loop sleeps with no free place (attempts in flight and claims
        # under way fill the process): the next place to free up wakes it.
        self._starved = False
        # Where claimed deliveries are sent from: set while `run` runs.
        self._sender: tuple[aiohttp.ClientSession, anyio.abc.TaskGroup] | None = None
        self._results: list[dict[str, Any]] = []
        self._have_results = anyio.Event()
        # Set (and replaced) whenever attempts in flight or claims under way go down.
        self._fewer = anyio.Event()
        self._keys: dict[tuple[uuid.UUID, bytes], bytes] = {}
        # Endpoints whose results a record left out: when their results are tried
        # again (time.monotonic()), and the pause after that try.
        self._held_until: dict[str, float] = {}
        self._held_pause: dict[str, float] = {}
        self._flushing = anyio.Lock()
        self._stopping = False
        self.claims_stopped = anyio.Event()  # a soft stop began: no more claims
        self._log = log.get("webhooks")

    # --- wake-ups -------------------------------------------------------------------------

    def notify(self, _payload: str = "") -> None:
        self._wake.set()

    def resync(self) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # --- the loop ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.config.concurrency,
            limit_per_host=0,
            resolver=self._guard.resolver(),
            use_dns_cache=False,
        )
        async with (
            aiohttp.ClientSession(
                connector=connector,
                trust_env=False,  # no proxy from the environment: the guard decides
                auto_decompress=False,  # the log keeps the bytes as they came
                timeout=aiohttp.ClientTimeout(total=None),
                skip_auto_headers=("User-Agent",),
            ) as session,
            anyio.create_task_group() as tg,
        ):
            self._sender = (session, tg)
            tg.start_soon(self._record_loop)
            task_status.started()
            try:
                await self._claim_loop()
                # A record's claim may still be under way: what it claims is sent.
                await self._wait_until(lambda: not self._reserved)
                self.claims_stopped.set()
                # A soft stop: the attempts in flight end (each within its timeout) and
                # are recorded; the caller's grace bounds the wait by cancelling it.
                await self._wait_idle()
            finally:
                self._sender = None  # the last flush claims nothing
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await self._flush_all()
                tg.cancel_scope.cancel()

    async def shutdown(self, grace: float) -> None:
        """Soft stop: claim nothing more, let the attempts in flight end (each is bounded
        by its timeout) for up to `grace` seconds, and record them."""
        self._stopping = True
        self._wake.set()
        with anyio.move_on_after(grace):
            await self._wait_idle()
        with anyio.move_on_after(5):
            await self._flush_all()

    async def _wait_idle(self) -> None:
        """Until no attempt is in flight and no claim is under way (a record's claim
        returning after the stop began starts attempts of its own)."""
        await self._wait_until(lambda: not self._in_flight and not self._reserved)

    async def _wait_until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self._fewer.wait()

    def _went_down(self) -> None:
        """Attempts in flight or claims under way went down: a place may be free."""
        if self._starved:
            self._starved = False
            self._wake.set()
        # Every waiter waits on the event current when it looked: set that one, and
        # let later waits have a fresh one.
        fewer, self._fewer = self._fewer, anyio.Event()
        fewer.set()

    def _free(self) -> int:
        """Places this process can still fill."""
        return self.config.concurrency - self._in_flight - self._reserved

    def _send(self, claimed: list[_Claimed]) -> None:
        """Start an attempt for each claimed delivery."""
        if not claimed:
            return
        if self._sender is None:
            # `run` was cancelled while a record's claim was under way (a hard stop; a
            # soft one waits for it and sends what it took): as after a crash, the
            # leases run out and the rescue puts these back, with an interrupted
            # attempt on record.
            self._log.warning("webhook_claimed_while_stopping", deliveries=len(claimed))
            return
        session, tg = self._sender
        for row in claimed:
            self._in_flight += 1
            tg.start_soon(self._deliver, session, row)

    async def _claim_loop(self) -> None:
        failures = 0
        while not self._stopping:
            free = self._free()
            claimed: list[_Claimed] = []
            if free > 0:
                try:
                    self._reserved += free
                    try:
                        claimed = await self._claim(free)
                    finally:
                        self._reserved -= free
                        self._went_down()
                    failures = 0
                    if self._health is not None:
                        self._health.ok("webhook_claim")
                except Exception as exc:  # the database away: back off and try again
                    failures += 1
                    self._log.warning("webhook_claim_failed", error=safe_text(str(exc)))
                    if self._health is not None:
                        self._health.failing("webhook_claim", str(exc))
                    await anyio.sleep(min(0.1 * 2**failures, 5.0) * (0.5 + self._rnd.random()))
                    continue
            self._send(claimed)
            if free > 0 and len(claimed) == free:
                continue  # more may be due right now
            # With no place left, what wakes the loop is a place freeing up (however
            # the process filled: its attempts, or a record's claim under way); an
            # endpoint's place frees only when its attempt is recorded, and the record
            # claims again itself.
            self._starved = self._free() <= 0
            with anyio.move_on_after(self.config.poll_interval * (0.75 + 0.5 * self._rnd.random())):
                await self._wake.wait()
            self._wake = anyio.Event()
            self._starved = False

    def _claim_args(self, n: int) -> tuple[int, uuid.UUID, int, int, int, int]:
        """webhook_claim's arguments after `owner`, for `n` deliveries."""
        c = self.config
        return (n, uuid.uuid4(), c.max_in_flight, c.timeout, c.lease_margin, c.tenant_in_flight)

    async def _claim(self, n: int) -> list[_Claimed]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(Q["claim"], self._owner, *self._claim_args(n))
            # Its own transaction, its advisory lock transaction-scoped: the release
            # skips the pool's reset, a round trip on the claim loop's path.
            leaves_no_session_state(conn)
        return _claimed(rows)

    # --- one attempt ----------------------------------------------------------------------------

    def _key(self, row: _Claimed, sealed: bytes) -> bytes:
        cached = self._keys.get((row.endpoint_id, sealed))
        if cached is None:
            if len(self._keys) > 10_000:
                self._keys.clear()
            cached = secrets.key_bytes(self._box.open(row.tenant_id, row.endpoint_id, sealed))
            self._keys[(row.endpoint_id, sealed)] = cached
        return cached

    async def _deliver(self, session: aiohttp.ClientSession, row: _Claimed) -> None:
        """One attempt, whatever happens in it: no answer of a receiver and no bug may
        end the deliverer (whose task group holds every tenant's attempts)."""
        try:
            result = await self._attempt(session, row)
        except Exception as exc:
            self._log.exception("webhook_attempt_crashed", delivery_id=str(row.id))
            result = self._result(
                row,
                self._clock.now(),
                0.0,
                {},
                _Response(error_class="internal", error=f"{type(exc).__name__}: {exc}"),
            )
        finally:
            self._in_flight -= 1
            self._went_down()
        self._results.append(result)
        self._have_results.set()
        if self._on_attempt is not None:
            self._on_attempt(
                result["result"], result["response_status"], result["duration_ms"] / 1000
            )

    async def _attempt(self, session: aiohttp.ClientSession, row: _Claimed) -> dict[str, Any]:
        attempted_at = self._clock.now()
        started = time.perf_counter()
        body = row.body.encode("utf-8")
        headers = {
            **row.headers,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": msg_id(row.id),
            "webhook-timestamp": str(int(time.time())),
        }
        response = _Response()
        try:
            keys = [self._key(row, row.secret)]
            if row.previous_secret is not None:
                keys.append(self._key(row, row.previous_secret))
            headers["webhook-signature"] = signature_header(
                keys, headers["webhook-id"], int(headers["webhook-timestamp"]), body
            )
            response = await self._post(session, row, headers, body)
        except SecretUnreadable as exc:
            response.error_class, response.error = "secret", str(exc)
            self._log.error("webhook_secret_unreadable", endpoint_id=str(row.endpoint_id))
        return self._result(
            row, attempted_at, (time.perf_counter() - started) * 1000, headers, response
        )

    def _result(
        self,
        row: _Claimed,
        attempted_at: datetime,
        duration_ms: float,
        headers: dict[str, str],
        response: _Response,
    ) -> dict[str, Any]:
        """The attempt as webhook_record_leaving_held takes it, with the delivery's next
        state."""
        decision = decide(
            attempts=row.attempts,
            schedule=row.schedule or self.config.schedule,
            status=response.status,
            headers=response.headers,
            error_class=response.error_class,
            now=self._clock.now(),
            rng=self._rnd,
        )
        sent_headers = {
            k: (REDACTED if k in row.headers else v)  # the tenant's own headers may be secrets
            for k, v in headers.items()
        }
        if decision.next_state == "dead":
            self._log.warning(
                "webhook_dead_lettered",
                tenant_id=str(row.tenant_id),
                delivery_id=str(row.id),
                endpoint_id=str(row.endpoint_id),
                reason=decision.reason,
                attempts=row.attempts,
            )
        cap = self.config.body_cap
        return {
            "tenant_id": str(row.tenant_id),
            "delivery_id": str(row.id),
            "endpoint_id": str(row.endpoint_id),
            "attempt": row.attempts,
            "attempted_at": attempted_at.isoformat(),
            "url": row.url,
            "result": decision.result,
            "request_headers": sent_headers,
            "request_body": row.body.encode("utf-8")[:cap].decode("utf-8", "ignore"),
            "response_status": response.status,
            "response_headers": response.headers if response.status is not None else None,
            "response_body": response.body if response.status is not None else None,
            "duration_ms": duration_ms,
            "error_class": response.error_class,
            "error": response.error,
            "next_state": decision.next_state,
            "next_attempt_at": decision.next_attempt_at.isoformat()
            if decision.next_attempt_at is not None
            else None,
            "reason": decision.reason,
            "success": decision.success,
        }

    async def _post(
        self,
        session: aiohttp.ClientSession,
        row: _Claimed,
        headers: dict[str, str],
        body: bytes,
    ) -> _Response:
        out = _Response()
        try:
            host = urlsplit(row.url).hostname or ""
            literal = ip_literal(host)
            if literal is not None:
                # aiohttp connects to an address in the URL without asking the resolver.
                self._guard.check_address(host, literal)
            async with session.post(
                row.url,
                data=body,
                headers=headers,
                allow_redirects=False,  # a 3xx is a failure: redirects could leave the guard
                timeout=aiohttp.ClientTimeout(total=row.timeout),
            ) as resp:
                out.status = resp.status
                out.headers = _headers(resp.headers)
                out.body = await _read_capped(resp.content, self.config.body_cap)
        except ForbiddenAddress as exc:
            out.error_class, out.error = "refused", str(exc)
        except TimeoutError:
            out.error_class = "timeout"
            out.error = f"no complete response within {row.timeout} s"
        except aiohttp.ClientConnectorDNSError as exc:
            out.error_class, out.error = "dns", safe_text(str(exc))
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
            out.error_class, out.error = "tls", safe_text(str(exc))
        except aiohttp.ClientConnectorError as exc:
            out.error_class, out.error = "connect", safe_text(str(exc))
        except (
            aiohttp.ServerDisconnectedError,
            aiohttp.ClientPayloadError,
            aiohttp.ClientOSError,
            ConnectionResetError,
        ) as exc:
            out.error_class, out.error = "reset", safe_text(str(exc)) or type(exc).__name__
        except ssl.SSLError as exc:
            out.error_class, out.error = "tls", safe_text(str(exc))
        except aiohttp.ClientError as exc:
            out.error_class, out.error = "protocol", safe_text(str(exc)) or type(exc).__name__
        if out.error_class is not None:
            out.status = None  # a response cut short is no response
        return out

    # --- recording ------------------------------------------------------------------------------

    async def _record_loop(self) -> None:
        while True:
            # New results, or the time to try left-out ones again.
            with anyio.move_on_after(self._until_held_retry()):
                await self._have_results.wait()
            self._have_results = anyio.Event()
            await self._flush(claim_again=True)

    def _until_held_retry(self) -> float:
        """Seconds until left-out results are due to be tried again (none: forever).
        Pauses of endpoints with no result left are dropped here: a result recorded on
        the error path (one by one), or given up on, ends its endpoint's pause there
        only if that was its last."""
        waiting = {r["endpoint_id"] for r in self._results}
        for endpoint in [e for e in self._held_until if e not in waiting]:
            del self._held_until[endpoint]
            self._held_pause.pop(endpoint, None)
        if not self._held_until:
            return math.inf
        return max(0.0, min(self._held_until.values()) - time.monotonic())

    async def _flush_all(self) -> None:
        """Flush until nothing is left (the caller bounds the wait): what a record left
        out is tried again every `_LEFT_OUT_RETRY` seconds."""
        await self._flush(every=True)
        while self._results:
            await anyio.sleep(_LEFT_OUT_RETRY)
            await self._flush(every=True)

    async def _flush(self, *, claim_again: bool = False, every: bool = False) -> None:
        """Record what has finished, in batches, until each result had its turn;
        `claim_again`: each batch's transaction also claims deliveries for this
        process's free places (the record loop's flushes; not those of a stop).  A
        result left out (its endpoint's row held elsewhere) stays in the list, and so
        does every later result of that endpoint: they are recorded together, in the
        order they came, by a later flush once the endpoint's pause is over (`every`:
        whatever the pauses).  One flush at a time (the record loop, a stop and the end
        of `run` all flush): two would take the same results."""
        async with self._flushing:
            failures = 0
            now = time.monotonic()
            # Endpoints whose results wait for a later flush.
            held = set() if every else {e for e, t in self._held_until.items() if t > now}
            while batch := self._next_batch(held):
                try:
                    try:
                        took_all_due, left_out = await self._record(batch, claim_again=claim_again)
                        self._consumed(batch, left_out, wake_claims=not took_all_due)
                        held.update(self._held_again(batch, left_out))
                    except UNAVAILABLE:
                        raise
                    except Exception as exc:
                        # Something in the batch that the database refuses: one such
                        # attempt must not stop every other's recording.  Each alone,
                        # and one refused alone without the details it was refused for.
                        self._log.error("webhook_record_refused", error=safe_text(str(exc)))
                        held.update(await self._record_one_by_one(batch))
                except UNAVAILABLE as exc:
                    # Kept in memory and tried again; if the process dies meanwhile, the
                    # leases run out and the rescue records the attempts as interrupted.
                    failures += 1
                    self._log.warning("webhook_record_failed", error=safe_text(str(exc)))
                    if self._health is not None:
                        self._health.failing("webhook_record", str(exc))
                    await anyio.sleep(min(0.1 * 2**failures, 5.0) * (0.5 + self._rnd.random()))
                    continue
                if failures and self._health is not None:
                    self._health.ok("webhook_record")
                failures = 0

    def _held_again(self, batch: list[dict[str, Any]], left_out: frozenset[str]) -> set[str]:
        """The endpoints of `batch`'s left-out results, each paused before its next try
        (50 ms, doubling to a second while it stays held); the others' pauses end."""
        held = {r["endpoint_id"] for r in batch if r["delivery_id"] in left_out}
        now = time.monotonic()
        for r in batch:
            endpoint = r["endpoint_id"]
            if endpoint in held:
                pause = min(self._held_pause.get(endpoint, _LEFT_OUT_RETRY / 2) * 2,
                            _LEFT_OUT_RETRY_MAX)  # fmt: skip
                self._held_pause[endpoint] = pause
                self._held_until[endpoint] = now + pause
            else:
                self._held_pause.pop(endpoint, None)
                self._held_until.pop(endpoint, None)
        return held

    def _next_batch(self, held: set[str]) -> list[dict[str, Any]]:
        """The oldest results, but those of endpoints in `held`."""
        if not held:
            return self._results[:_RECORD_BATCH]
        return [r for r in self._results if r["endpoint_id"] not in held][:_RECORD_BATCH]

    def _consumed(
        self, batch: list[dict[str, Any]], left_out: frozenset[str], *, wake_claims: bool = True
    ) -> None:
        """`batch`'s results are on record (or given up on, logged), but those whose
        deliveries are in `left_out`."""
        done = {id(r) for r in batch if r["delivery_id"] not in left_out}
        if len(done) == len(self._results):
            self._results.clear()
        else:
            self._results[:] = [r for r in self._results if id(r) not in done]
        if wake_claims and done:
            # Recording freed endpoints' places (their deliveries left `sending`).
            self._wake.set()

    async def _record(
        self, batch: list[dict[str, Any]], *, claim_again: bool = False
    ) -> tuple[bool, frozenset[str]]:
        """Record `batch`; `claim_again`: in the same transaction and round trip, claim
        and start deliveries for this process's free places
        (webhook_record_leaving_held_and_claim).
        Returns whether that claim took every delivery due, so that the claim loop
        would find none (some came back, fewer than it asked for; none back says
        nothing: the claim may not have run), and the deliveries whose results the
        record left out (their endpoint's row was held elsewhere)."""
        # The places the batch's deliveries held, and one more if that is not the
        # process's last: the other free places stay the claim loop's, which must not
        # wait for a record (one waiting for a delivery's row, say) to claim for them.
        # The one more tells whether more is due than the record freed: only then
        # (every place asked for taken) is the loop woken to claim the rest.
        free = self._free() if claim_again and not self._stopping else 0
        n = len(batch) + 1 if free > len(batch) + 1 else min(free, len(batch))
        cfg = self.config.breaker.as_json() | {"lease_margin_s": self.config.lease_margin}
        args = (self._owner, safe_json(batch), cfg)
        self._reserved += max(n, 0)
        claimed: list[asyncpg.Record] = []
        left_out: frozenset[str] = frozenset()
        try:
            async with self._pool.acquire() as conn:
                if n > 0:
                    rows = await conn.fetch(Q["record_and_claim"], *args, *self._claim_args(n))
                    claimed = [r for r in rows if not r["left_out"]]
                    left_out = frozenset(str(r["id"]) for r in rows if r["left_out"])
                else:
                    later = await conn.fetchval(Q["record"], *args)
                    left_out = frozenset(str(i) for i in later or ())
                leaves_no_session_state(conn)  # one statement, its own transaction
        finally:
            self._reserved -= max(n, 0)
            self._send(_claimed(claimed))
            self._went_down()
        return 0 < len(claimed) < n, left_out

    async def _record_one_by_one(self, batch: list[dict[str, Any]]) -> set[str]:
        """Each result of `batch` alone, consumed as it goes, so that the database going
        away midway leaves only the rest to record.  Returns the endpoints of the
        results left out (kept for a later flush, with the endpoint's later results)."""
        held: set[str] = set()
        for result in batch:
            if result["endpoint_id"] in held:
                continue  # behind an earlier result of its endpoint
            try:
                _, left_out = await self._record([result])
                if left_out:
                    held.update(self._held_again([result], left_out))
                    continue
            except UNAVAILABLE:
                raise
            except Exception as exc:
                plain = {
                    **result,
                    "request_headers": {},
                    "request_body": "",
                    "response_headers": None,
                    "response_body": None,
                    "error": f"the attempt's details could not be stored: {exc}"[:1000],
                }
                try:
                    _, left_out = await self._record([plain])
                    if left_out:
                        held.update(self._held_again([plain], left_out))
                        continue
                except UNAVAILABLE:
                    raise
                except Exception:
                    # Left leased: when the lease runs out the rescue records the
                    # attempt as interrupted and the delivery is tried again.
                    self._log.exception(
                        "webhook_record_lost",
                        delivery_id=result["delivery_id"],
                        tenant_id=result["tenant_id"],
                    )
            self._consumed([result], frozenset())
        return held


def _claimed(rows: list[asyncpg.Record]) -> list[_Claimed]:
    return [
        _Claimed(
            r["tenant_id"],
            r["id"],
            r["endpoint_id"],
            r["event_type"],
            r["body"],
            r["attempts"],
            r["url"],
            r["headers"],
            r["secret"],
            r["previous_secret"],
            r["timeout_seconds"],
            tuple(r["retry_schedule"]) if r["retry_schedule"] is not None else None,
        )
        for r in rows
    ]


def _headers(raw: Any) -> dict[str, str]:
    """Response headers, names in lower case, repeated ones joined as HTTP allows."""
    out: dict[str, str] = {}
    for name, value in raw.items():
        key = safe_text(name).lower()
        text = safe_text(value)
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


async def _read_capped(content: aiohttp.StreamReader, cap: int) -> str:
    """Up to `cap` bytes of the body (an endless body is cut there), as text."""
    raw = bytearray()
    while len(raw) < cap:
        chunk = await content.read(cap - len(raw))
        if not chunk:
            break
        raw += chunk
    return safe_text(bytes(raw).decode("utf-8", "replace"))
