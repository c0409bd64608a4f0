"""The worker pool: one claim loop per queue, one task per running job.

A queue's loop sleeps until something may be runnable (a NOTIFY hint, a freed slot,
the next scheduled job's due time, or a jittered poll), then claims as many rows as it
has room for.  The claim protocol (which rows, in what order, fair among tenants, and
whether any runnable row is left) belongs to `tenantry.claim_jobs` in functions.sql:
the loop passes how many rows it can take and the cursor the last claim gave it, and
claims again only while the function says rows may remain, and, when rows wait only
for their tenants' cap, again as its jobs' outcomes are written.  The claim a NOTIFY
prompted re-arms the queue's wake-up throttle (the next commit notifies), and when it
finds a producer that stayed quiet still committing, the loop waits for that commit
beside its claims and claims again (the throttle's gate, tenantry.wake_at_commit).
NOTIFY is only a hint: after each wake the loop fetches again twice (the trailing
fetches), and the poll catches whatever a throttled or lost notification swallowed.
"""

from __future__ import annotations

import asyncio
import math
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol

import anyio
import asyncpg
import orjson
import structlog
from anyio.abc import TaskGroup, TaskStatus

from .. import logging as log
from ..clock import Clock, Random, SystemClock, system_random
from ..errors import Cancel, PermanentFailure, Snooze
from ..safetext import safe_json, safe_text
from ..sql import queries_for
from ..supervise import Health, supervise
from .backoff import full_jitter
from .model import Job
from .outcomes import Bury, Complete, JobKey, Outcome, OutcomeWriter, Release, Retry
from .registry import Policy, Registration, Registry

Q = queries_for(__file__)
_ERROR_TEXT_MAX = 4000
# After a wait for quiet commits ran out, none for this long (seconds): a transaction
# that holds the gate for long (constraints set IMMEDIATE, then left open) would
# otherwise cost every NOTIFY's claim the whole wait.
_QUIET_WAIT_BACKOFF = 1.0


@dataclass(frozen=True)
class WorkerConfig:
    queues: Mapping[str, int]
    tenant_concurrency: int | None = None
    poll_interval: float = 1.0
    lease_seconds: float = 30.0
    job_timeout: float = 300.0
    # After a wake-up, fetch again this much later, then once more: catches rows whose
    # NOTIFY the throttle swallowed because another transaction had notified within
    # its 5 ms window.  The first a little over two windows (not a round figure like
    # 20 ms, which producers enqueueing on a timer line up with: the fetch then races
    # their commit); the second for a quiet commit that took longer to become visible
    # (an fsync, a synchronous replica, a slow deferred trigger of the producer's).
    trailing_fetch: float = 0.011
    late_trailing_fetch: float = 0.101
    # After a re-arm found a producer that stayed quiet still committing (the gate of
    # tenantry.wake_at_commit), wait this long at most for its commit to become visible,
    # then claim again.  The wait runs beside the claim loop (on a connection of the
    # worker pool).  A commit's visibility takes its WAL flush (5-20 ms at worst on a
    # busy disk here); what takes longer is a transaction that set its constraints
    # IMMEDIATE and is still open: the trailing fetches are left to that one.
    quiet_commit_wait: float = 0.050
    # Re-arm the wake-up throttle at most once per this many seconds per queue: a
    # NOTIFY's claim within it goes without (a commit after it may stay quiet for the
    # throttle's 5 ms window, found by the next NOTIFY or the trailing fetch).  0: every
    # NOTIFY's claim re-arms (each commit after a claim then notifies).  With 5 ms
    # (bench.sustained, 500 and 1,000 jobs/s from pgbench): two thirds of the NOTIFYs,
    # 55-65% of the claims and 70% of the worker's CPU, but commits after an
    # un-armed claim wait up to the window (bench.latency --background-rate 1000: p90
    # 3.4-4.4 ms against 2.1): off, as the wake-up latency is this setting's goal.
    rearm_interval: float = 0.0
    # Rows a queue claims ahead of its free slots, as a fraction of its concurrency.
    # While a batch runs, the next one is already being claimed, so the database's
    # work and ours overlap instead of taking turns (100,000-job drain: 15,400 to
    # 19,200 jobs/s).  A prefetched row waits only for a slot of this process; its
    # lease is heartbeated and it is handed back at shutdown.  0 disables it.
    prefetch: float = 0.5
    # A job whose kind this process has no handler for is retried (its attempts
    # untouched) until its kind has been unknown this long, then dead-lettered as
    # `unknown_kind`: during a rolling deploy the old processes meet the new kinds.
    unknown_kind_retry: float = 3600.0


# Test and bench hooks: called synchronously with an event name and its data.
Hook = Callable[[str, dict[str, Any]], None]


class JobObserver(Protocol):
    """Told of every claim and every job's start and end (the metrics), synchronously
    and on every job's path: typed calls, not the hook's dicts, so that watching costs
    a drain next to nothing."""

    def claim_ran(self, queue: str, count: int, seconds: float) -> None: ...

    def job_finished(
        self, job: Job, outcome: Outcome | None, ran: float | None, waited: float | None
    ) -> None:
        """One call per job, at its end.  `outcome` None: completed in the handler's own
        transaction (or abandoned); `ran`: the handler's run time (None: it never
        started); `waited`: from creation to the start, for a first attempt only."""


@dataclass(frozen=True)
class Claimed:
    """What one call of the claim function gave: the rows, the cursor to pass next
    time, and whether runnable rows may remain (claim again while there is room)."""

    rows: list[asyncpg.Record]
    cursor: uuid.UUID | None
    more: bool
    # Runnable rows were left behind for their tenants' cap: claim again when this
    # queue's jobs finish.
    capped: bool = False
    # A claim that re-armed the wake-up throttle found a producer that stayed quiet
    # still committing: its job may be missing here (see Worker.claim_rearming).
    gate_free: bool = True


class _Running:
    __slots__ = ("began", "deadline", "job", "task", "timeout", "waited", "why")

    def __init__(self, job: Job, timeout: float, deadline: float) -> None:
        self.job = job
        self.timeout = timeout
        self.deadline = deadline  # monotonic; the watchdog cancels the job after it
        self.task: asyncio.Task[None] | None = None
        self.why: str | None = None  # why it was cancelled from outside
        self.began: float | None = None  # monotonic, when its handler was called
        self.waited: float | None = None  # a first attempt's wait, for the observer

    def cancel(self, why: str) -> None:
        if self.why is None:
            self.why = why
        if self.task is not None:
            self.task.cancel(why)


class QueueLoop:
    def __init__(self, worker: Worker, queue: str, concurrency: int) -> None:
        self.w = worker
        self.queue = queue
        # The process's own concurrency (TENANTRY_QUEUES); an operator's setting in
        # tenantry.queue_controls overrides it while it is set.
        self.configured = concurrency
        self.concurrency = concurrency
        # Paused by an operator (tenantry.queue_controls): no claim, no new start.  The
        # claim function refuses a paused queue's rows by itself; this flag only keeps
        # the loop from asking and hands back what it had prefetched.
        self.paused = False
        # A control changed (or may have: the listener reconnected): read them again
        # before the next claim.
        self._controls_stale = True
        self.running: dict[JobKey, _Running] = {}
        # Claimed (leased) rows waiting for a slot: the prefetch.
        self.ready: deque[asyncpg.Record] = deque()
        self.prefetch = int(concurrency * worker.config.prefetch)
        # Where the next claim's walk over the tenants starts (None: the first tenant).
        self.cursor: uuid.UUID | None = None
        self._wake = anyio.Event()
        self._wake.set()  # claim at once on start, without waiting for a wake-up or a poll
        self._saturated = False
        self._due: float | None = None  # monotonic time of the next scheduled job
        self._trailing: float | None = None
        self._late_trailing: float | None = None
        # A NOTIFY woke the loop: re-arm the queue's wake-up throttle before claiming.
        self._rearm = False
        # Monotonic time before which no wait for quiet commits is made: one ran out (a
        # transaction holding the gate for long), so the next would likely run out too.
        self._quiet_wait_after = 0.0
        self._waits: TaskGroup | None = None  # where the waits run
        self._waiting = False  # a wait for quiet commits is in flight
        self._wait_again = False  # a re-arm found the gate held meanwhile
        # Monotonic time of the last re-arm (rearm_interval).
        self._rearmed_at = -math.inf
        # The last claim left rows behind for their tenants' cap.
        self.capped = False
        # Outcomes written so far: a claim that comes back capped after one was written
        # while it was on its way claims again (that outcome may have freed the cap).
        self._outcomes_seen = 0
        self._poll_due = True

    @property
    def claimable(self) -> int:
        """Rows to claim now: free slots plus the prefetch headroom, less the claimed
        rows already waiting for a slot."""
        return self.concurrency + self.prefetch - len(self.running) - len(self.ready)

    def start_ready(self) -> None:
        while (
            self.ready
            and len(self.running) < self.concurrency
            and not self.w.stopping
            and not self.paused
        ):
            self.w.start_job(self, self.ready.popleft())

    def controls_changed(self) -> None:
        self._controls_stale = True
        self._wake.set()

    def apply_controls(self, paused: bool, concurrency: int | None) -> None:
        """Follow the queue's controls as the database has them now."""
        wanted = concurrency or self.configured
        changed = (paused, wanted) != (self.paused, self.concurrency)
        self.paused = paused
        self.concurrency = wanted
        self.prefetch = int(wanted * self.w.config.prefetch)
        if not changed:
            return
        self.w.log.info(
            "queue_controls_applied", queue=self.queue, paused=paused, concurrency=wanted
        )
        if paused:
            # Claimed but not started: back to the queue, for whoever resumes it.
            self.w.hand_back(self.ready)
            self.ready.clear()
        else:
            self.start_ready()
            self._saturated = False
            self._wake.set()

    def wake(self, *, trailing: bool = False, notified: bool = False) -> None:
        if notified:
            self._rearm = True
        if trailing:
            now = self.w.clock.monotonic()
            self._trailing = now + self.w.config.trailing_fetch
            self._late_trailing = now + self.w.config.late_trailing_fetch
        self._wake.set()

    def outcomes_written(self) -> None:
        """Outcomes of this process were written: a tenant the last claim found at its
        cap may have room again."""
        self._outcomes_seen += 1
        if self.capped and self.claimable > 0:
            self._wake.set()

    def due_at(self, when: datetime) -> None:
        """A job of this queue becomes runnable at `when`: make sure we wake then."""
        delay = (when - self.w.clock.now()).total_seconds()
        at = self.w.clock.monotonic() + max(delay, 0.0)
        if self._due is None or at < self._due:
            self._due = at
            self._wake.set()

    def slot_freed(self) -> None:
        self.start_ready()
        # Claim in batches: wait for half the slots when the queue was saturated,
        # rather than claiming one row per finished job.
        if self._saturated and self.claimable >= max(1, self.concurrency // 2):
            self._saturated = False
            self._wake.set()

    async def run(self) -> None:
        async with anyio.create_task_group() as waits:
            self._waits = waits
            self._waiting = False
            while not self.w.stopping:
                await self._sleep()
                if self.w.stopping:
                    break
                polling = self._poll_due
                self._poll_due = False
                if polling or self._controls_stale:
                    # The due time and the controls, in one round trip.
                    self._controls_stale = False
                    await self._refresh_due()
                if not self.paused:
                    await self._fill()
            waits.cancel_scope.cancel()

    async def _sleep(self) -> None:
        now = self.w.clock.monotonic()
        jitter = 0.5 + self.w.rnd.random()  # poll at 0.5x to 1.5x the interval
        poll_at = now + self.w.config.poll_interval * jitter
        deadline = poll_at
        for t in (self._due, self._trailing, self._late_trailing):
            if t is not None:
                deadline = min(deadline, t)
        if not self._wake.is_set():
            with anyio.move_on_after(max(deadline - now, 0.0)):
                await self._wake.wait()
        self._wake = anyio.Event()
        now = self.w.clock.monotonic()
        if self._due is not None and self._due <= now:
            self._due = None
        if self._trailing is not None and self._trailing <= now:
            self._trailing = None
        if self._late_trailing is not None and self._late_trailing <= now:
            self._late_trailing = None
        if now >= poll_at:
            self._poll_due = True

    async def _fill(self) -> None:
        rearm = self._rearm and self.claimable > 0
        if rearm:
            self._rearm = False
            now = self.w.clock.monotonic()
            if now < self._rearmed_at + self.w.config.rearm_interval:
                rearm = False  # re-armed within the interval: this claim goes without
            else:
                self._rearmed_at = now
        gate_free = await self._claim_while_room(rearm=rearm)
        if not gate_free and self.claimable > 0 and not self.w.stopping:
            self._await_quiet_commits()

    def _await_quiet_commits(self) -> None:
        """The re-arm found producers that stayed quiet still committing: their jobs may
        have been invisible to the claim just made, and no NOTIFY will tell of them.
        Wait, beside the loop, until their commits are visible (or `quiet_commit_wait`
        ran out), then claim again, rather than leave them to the trailing fetch 11 ms
        later.  One wait at a time: a re-arm that finds the gate held while one is in
        flight has another follow it (a producer that stayed quiet after that wait's
        lock request notifies instead, but the wait, once granted, holds the gate too)."""
        if self._waiting:
            self._wait_again = True
            return
        if self._waits is None or self.w.clock.monotonic() < self._quiet_wait_after:
            return
        self._waiting = True
        if self.w.hook is not None:
            self.w.hook("quiet_wait_started", {"queue": self.queue})
        self._waits.start_soon(self._quiet_wait)

    async def _quiet_wait(self) -> None:
        try:
            done = await self.w.await_quiet_wakes(self.queue)
        finally:
            self._waiting = False
        if done:
            self._wake.set()  # claim again: those commits are visible now
        else:
            self._quiet_wait_after = self.w.clock.monotonic() + _QUIET_WAIT_BACKOFF
        if self._wait_again:
            self._wait_again = False
            self._await_quiet_commits()

    async def _claim_while_room(self, *, rearm: bool = False) -> bool:
        """Claim while there is room and rows may remain; `rearm`: the first claim is a
        NOTIFY's (it re-arms the throttle).  False when that claim found the gate held."""
        gate_free = True
        while self.claimable > 0 and not self.w.stopping:
            outcomes_before = self._outcomes_seen
            if rearm:
                rearm = False
                got = await self.w.claim_rearming(self.queue, self.claimable, self.cursor)
                gate_free = got is None or got.gate_free
            else:
                got = await self.w.claim(self.queue, self.claimable, self.cursor)
            if got is None:  # database unavailable: the poll will try again
                return gate_free
            if self.w.stopping:
                # Shutdown began while this claim was in flight: hand its rows back
                # now rather than leave them leased until the lease runs out.
                self.w.hand_back(got.rows)
                return gate_free
            self.cursor = got.cursor
            self.capped = got.capped
            if got.capped and self._outcomes_seen != outcomes_before:
                self._wake.set()  # an outcome written meanwhile may have freed a cap
            self.ready.extend(got.rows)
            self.start_ready()
            if not got.more:
                break  # nothing runnable is left for us
            if not got.rows:
                # Concurrent claims took what this one chose: look again shortly
                # rather than spin.
                self.wake(trailing=True)
                break
        self._saturated = self.claimable <= 0
        return gate_free

    async def _refresh_due(self) -> None:
        try:
            async with self.w.worker_pool.acquire() as conn:
                row = await conn.fetchrow(Q["next_due"], self.queue)
        except Exception as exc:  # the database is away: the next poll tries again
            self.w.log.debug("next_due_failed", queue=self.queue, error=safe_text(str(exc)))
            self._controls_stale = True
            return
        if row is not None:
            self.apply_controls(bool(row["paused"]), row["concurrency"])
            if self.w.hook is not None:
                self.w.hook("controls_read", {"queue": self.queue, "paused": self.paused})
        if row is not None and row["due"] is not None:
            # Use the database's own clock for the delay: run_at was set by it.
            delay = (row["due"] - row["db_now"]).total_seconds()
            at = self.w.clock.monotonic() + max(delay, 0.0)
            if self._due is None or at < self._due:
                self._due = at


class Worker:
    def __init__(
        self,
        pool: asyncpg.Pool,
        registry: Registry,
        config: WorkerConfig,
        *,
        owner: str | None = None,
        clock: Clock | None = None,
        rnd: Random | None = None,
        hook: Hook | None = None,
        worker_pool: asyncpg.Pool | None = None,
        claim_pool: asyncpg.Pool | None = None,
        health: Health | None = None,
        observer: JobObserver | None = None,
    ) -> None:
        # Handlers get connections from `pool` (tenant code's login: row-level
        # security, no cross-tenant function).  Outcomes and the next-due query go
        # through `worker_pool` (the worker's login, TENANTRY_WORKER_URL); claims and
        # heartbeats through `claim_pool` (the worker's login with
        # `db.CLAIM_SETTINGS`).
        self.pool = pool
        self.worker_pool = worker_pool or pool
        self.claim_pool = claim_pool or self.worker_pool
        self.registry = registry
        self.config = config
        self.owner = owner or f"worker-{uuid.uuid4()}"
        self.clock = clock or SystemClock()
        self.rnd = rnd or system_random()
        self.hook = hook
        self.observer = observer
        self.health = health or Health()
        self.stopping = False
        self.loops = {q: QueueLoop(self, q, n) for q, n in config.queues.items()}
        self.writer = OutcomeWriter(self.worker_pool, self.owner, on_flushed=self._flushed)
        # The queue of each outcome not yet written (to wake that queue's loop after).
        self._outcome_queue: dict[JobKey, str] = {}
        # One plain asyncio task per running job, not an anyio task group: the group's
        # spawn, cancel scope and fail_after cost more than the no-op job itself (they
        # were about half of the worker's CPU in the drain benchmark's profile).
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = 0
        # Timeouts: one watchdog for all jobs instead of a timer per job (asyncio's
        # timeout() was about a fifth of the worker's CPU in the drain profile).
        self._watch_wake = anyio.Event()
        self._watch_next = math.inf
        self._idle = anyio.Event()
        self._done = anyio.Event()
        # Given a deadline when claiming stops: a claim blocked in the database (a lock
        # held by a migration or VACUUM FULL) must not hold up the shutdown.
        self._claiming = anyio.CancelScope()
        # How long the end of run() may spend handing jobs back and writing the last
        # outcomes: the rest of the grace on a soft stop, a moment on a hard one.
        self._final_budget = 10.0
        self.log = log.get("worker", worker=self.owner)

    # --- signals from outside -----------------------------------------------------

    def notify(self, queue: str) -> None:
        """A NOTIFY hint arrived for `queue` (payload of the channel)."""
        loop = self.loops.get(queue)
        if loop is not None:
            loop.wake(trailing=True, notified=True)

    def resync(self) -> None:
        """The listener (re)connected: notifications may have been lost; sweep."""
        for loop in self.loops.values():
            loop.controls_changed()
            loop.wake(trailing=True)

    def controls_changed(self, queue: str) -> None:
        """An operator changed `queue`'s controls (payload of tenantry_controls)."""
        loop = self.loops.get(queue)
        if loop is not None:
            loop.controls_changed()

    @property
    def running_count(self) -> int:
        return self._running

    @property
    def stopped(self) -> bool:
        """run() has ended."""
        return self._done.is_set()

    async def wait_stopped(self) -> None:
        await self._done.wait()

    # --- lifecycle ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            # Whatever ended run(), shutdown() must not wait for it forever.
            self._done.set()

    async def _run(self, task_status: TaskStatus[None]) -> None:
        await self._announce_queues()
        async with anyio.create_task_group() as infra:
            for name, fn in (
                ("outcome_writer", self.writer.run),
                ("heartbeat", self._heartbeat),
                ("watchdog", self._watchdog),
            ):
                infra.start_soon(partial(supervise, name, fn, health=self.health))
            try:
                with self._claiming:
                    async with anyio.create_task_group() as loops:
                        for q, loop in self.loops.items():
                            name = f"claim_loop:{q}"
                            loops.start_soon(partial(supervise, name, loop.run, health=self.health))
                        task_status.started()
                if self.hook is not None:
                    self.hook("claiming_stopped", {"running": self.running_count})
                await self.wait_idle()
            finally:
                # Cancelled from outside (a hard stop), or after the grace: hand the jobs
                # back rather than leave them to lease expiry, within the budget.
                with anyio.CancelScope(shield=True), anyio.move_on_after(self._final_budget):
                    self.cancel_running("hard_stop")
                    if self._tasks:
                        await asyncio.wait(self._tasks)
                    # Every job task has ended: write their last outcomes, then stop.
                    await self.writer.drain()
            infra.cancel_scope.cancel()

    async def _announce_queues(self) -> None:
        """Throttle rows for this worker's queues, so that producers never create one
        (see tenantry.wake_at_commit).  Best effort: without them wake-ups are unthrottled."""
        try:
            with anyio.fail_after(10):
                await self.worker_pool.execute(Q["ensure_wake_keys"], list(self.loops))
        except Exception as exc:
            self.log.warning("wake_keys_failed", error=safe_text(str(exc)))

    async def shutdown(self, grace: float) -> None:
        """Soft stop (no new claims), wait up to `grace` for running jobs, then cancel
        the rest and hand their jobs back to the queue.  Returns within about `grace`
        whatever the database does: what cannot be handed back in time keeps its lease
        until it expires."""
        deadline = anyio.current_time() + grace
        self.stop_claiming()
        with anyio.move_on_after(grace):
            await self.wait_idle()
        self._final_budget = max(deadline - anyio.current_time(), 1.0)
        self.cancel_running("shutdown")
        await self._done.wait()

    def stop_claiming(self, *, claims_may_finish: float = 2.0) -> None:
        """No new claims.  A claim in flight may finish for `claims_may_finish` seconds
        (its rows are then handed back at once; cancelled, a claim that the database
        had already made would leave its rows leased until the lease runs out); one
        still blocked after that, on a lock say, is cancelled."""
        if not self.stopping:
            self.stopping = True
            self.log.info("worker_stopping", running=self.running_count)
        for loop in self.loops.values():
            # Prefetched rows never started: hand them back now.
            self.hand_back(loop.ready)
            loop.ready.clear()
            loop.wake()
        self._claiming.deadline = min(
            self._claiming.deadline, anyio.current_time() + claims_may_finish
        )

    def hard_stop(self) -> None:
        """A second signal: cancel everything now, and spend at most a moment handing
        jobs back."""
        self._final_budget = 1.0
        self.stop_claiming(claims_may_finish=0.0)
        self.cancel_running("hard_stop")

    def hand_back(self, rows: Iterable[asyncpg.Record]) -> None:
        """Release claimed rows that never started (their attempt is refunded)."""
        for row in rows:
            self.writer.put(Release((row["tenant_id"], row["id"])))

    def cancel_running(self, why: str) -> None:
        for loop in self.loops.values():
            for r in loop.running.values():
                r.cancel(why)

    async def wait_idle(self) -> None:
        while self.running_count:
            # Several may wait (shutdown and run): replacing an unset event would strand
            # the others on one that is never set.
            if self._idle.is_set():
                self._idle = anyio.Event()
            await self._idle.wait()

    # --- claiming -----------------------------------------------------------------

    async def await_quiet_wakes(self, queue: str) -> bool:
        """Wait until the producers that stayed quiet behind the gate when the re-arm
        tried it have committed, up to `quiet_commit_wait`: True when they have (their
        jobs are visible to the next claim)."""
        wait_ms = max(1, round(self.config.quiet_commit_wait * 1000))
        try:
            async with self.worker_pool.acquire() as conn:
                done = bool(await conn.fetchval(Q["await_quiet_wakes"], queue, wait_ms))
        except Exception as exc:
            self.log.debug("await_quiet_wakes_failed", queue=queue, error=safe_text(str(exc)))
            return False
        if self.hook is not None:
            self.hook("quiet_commits_awaited", {"queue": queue, "done": done})
        return done

    # The claim statement; a benchmark's subclass swaps in a fair-less one with the same
    # parameters and columns to measure what fairness costs.
    claim_statement: str = Q["claim"]

    async def claim_rearming(
        self, queue: str, limit: int, cursor: uuid.UUID | None
    ) -> Claimed | None:
        """The claim a NOTIFY prompted, re-arming the queue's wake-up throttle first, in the claim's
        transaction (before the claim's statements take their snapshots; see queries.sql
        claim_rearming): a producer stays quiet within the throttle's window only while a wake-up
        that no claim has acted on yet is pending (tenantry.wake_at_commit reads the row this
        resets).  Without the re-arm, a job committed within 5 ms after another's NOTIFY, and after
        the claim that NOTIFY woke, waited for the next NOTIFY or the trailing fetch: from commit to
        start p90 9 ms and p99 11-12 ms with 1,000 other jobs a second on the queue (bench.latency
        --background-rate 1000).  `gate_free` false: a producer that decided to stay quiet before
        the re-arm was still committing, and its job may be missing from this claim (the loop waits
        for it and claims again).

        The re-arm is best effort: when it fails (the function gives up on a lock on the
        throttle table after 10 ms: an operator's LOCK or VACUUM FULL held it for the
        claim pool's 5 s lock_timeout), the claim is made without it."""
        try:
            got = await self._claim(Q["claim_rearming"], queue, limit, cursor)
        except Exception as exc:
            self.log.debug("rearm_wake_failed", queue=queue, error=safe_text(str(exc)))
            return await self.claim(queue, limit, cursor)
        if self.hook is not None:
            self.hook("rearmed", {"queue": queue, "gate_free": got.gate_free})
        return got

    async def claim(self, queue: str, limit: int, cursor: uuid.UUID | None) -> Claimed | None:
        """Claim up to `limit` rows of `queue` (None: the database is unavailable)."""
        try:
            return await self._claim(self.claim_statement, queue, limit, cursor)
        except Exception as exc:
            # Whatever the connection raised (a terminated backend, a lock timeout, a
            # restart): report it and let the poll come back.
            self.log.warning("claim_failed", queue=queue, error=safe_text(str(exc)) or repr(exc))
            self.health.failing(f"claims:{queue}", str(exc) or repr(exc))
            return None

    async def _claim(
        self, statement: str, queue: str, limit: int, cursor: uuid.UUID | None
    ) -> Claimed:
        began = self.clock.monotonic()
        async with self.claim_pool.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(
                statement,
                queue,
                limit,
                self.owner,
                self.config.lease_seconds,
                cursor,
                self.config.tenant_concurrency,
            )
        self.health.ok(f"claims:{queue}")
        # The last row is the claim's state: the cursor and whether rows may remain.
        state = rows.pop()
        if self.observer is not None:
            self.observer.claim_ran(queue, len(rows), self.clock.monotonic() - began)
        if self.hook is not None:
            took = self.clock.monotonic() - began
            self.hook("claim_ran", {"queue": queue, "count": len(rows), "seconds": took})
            if rows:
                self.hook("claimed", {"queue": queue, "count": len(rows)})
        # gate_free: only the re-arming claim's statement has the column (NULL: no).
        gate_free = state.get("gate_free")
        return Claimed(
            rows,
            state["cursor_after"],
            bool(state["more"]),
            bool(state["capped"]),
            gate_free is not False,
        )

    def start_job(self, loop: QueueLoop, row: asyncpg.Record) -> None:
        reg = self.registry.get(row["kind"])
        policy = reg.policy if reg is not None else Policy()
        timeout = policy.timeout or self.config.job_timeout
        # The payload comes as JSON text and is decoded job by job: one that cannot be
        # read (a number no double holds, nesting deeper than the parser takes) fails
        # its own job, not the claim that brought it.
        payload_error: str | None = None
        try:
            payload = orjson.loads(row["payload"])
        except orjson.JSONDecodeError as exc:
            payload, payload_error = None, f"the payload cannot be decoded: {exc}"
        job = Job(
            id=row["id"],
            tenant_id=row["tenant_id"],
            queue=row["queue"],
            kind=row["kind"],
            payload=payload,
            attempt=row["attempts"],
            max_attempts=row["max_attempts"] or policy.max_attempts,
            priority=row["priority"],
            created_at=row["created_at"],
            _pool=self.pool,
            _lease_owner=self.owner,
        )
        deadline = self.clock.monotonic() + timeout
        entry = _Running(job, timeout, deadline)
        loop.running[(job.tenant_id, job.id)] = entry
        self._running += 1
        if deadline < self._watch_next:
            self._watch_wake.set()
        task = asyncio.get_running_loop().create_task(
            self._execute(loop, entry, row["unknown_kind_since"], payload_error)
        )
        entry.task = task
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # _execute turns every handler error into an outcome; this is our own bug.
            self.log.error("job_task_crashed", error=_describe(exc))

    # --- running ------------------------------------------------------------------

    async def _execute(
        self,
        loop: QueueLoop,
        entry: _Running,
        unknown_since: datetime | None,
        payload_error: str | None,
    ) -> None:
        job = entry.job
        key: JobKey = (job.tenant_id, job.id)
        jlog = _JobLog(self.log, job)
        # The id of the HTTP request that enqueued the job, if it says: bound to every
        # line this job's task logs, the handler's own included (the task has its own
        # copy of the context).
        rid = job.payload.get("request_id") if isinstance(job.payload, dict) else None
        if isinstance(rid, str):
            structlog.contextvars.bind_contextvars(request_id=safe_text(rid)[:128])
        outcome: Outcome | None
        try:
            if payload_error is not None:
                reg = self.registry.get(job.kind)
                outcome = self._dead(job, reg, "permanent", payload_error, jlog)
            else:
                outcome = await self._outcome(job, entry, jlog, unknown_since)
        except Exception as exc:
            # Deciding the outcome failed (a bug of ours): the attempt counts as failed
            # rather than its outcome being lost until the lease runs out.
            self.log.exception("job_outcome_failed", job_id=job.id)
            outcome = Retry(
                key,
                self.clock.now() + timedelta(seconds=self.config.lease_seconds),
                f"the outcome could not be decided: {_describe(exc)}",
                {"attempt": job.attempt, "error": _describe(exc), "worker": self.owner},
            )
        finally:
            loop.running.pop(key, None)
            self._running -= 1
            loop.slot_freed()
            if not self.running_count:
                self._idle.set()
        if outcome is not None:
            self._outcome_queue[key] = job.queue
            self.writer.put(outcome)
        elif job.completed_in_tx:
            loop.outcomes_written()  # its own transaction completed it
        if self.observer is not None:
            ran = None if entry.began is None else self.clock.monotonic() - entry.began
            self.observer.job_finished(job, outcome, ran, entry.waited)
        if self.hook is not None:
            self.hook(
                "finished",
                {"job": job, "outcome": outcome, "why": entry.why, "at": self.clock.monotonic()},
            )

    async def _outcome(
        self, job: Job, entry: _Running, jlog: _JobLog, unknown_since: datetime | None
    ) -> Outcome | None:
        key: JobKey = (job.tenant_id, job.id)
        reg = self.registry.get(job.kind)
        if reg is None:
            return self._unknown_kind(job, jlog, unknown_since)
        if job.attempt > job.max_attempts:
            # Rescued after its last attempt's worker died: nothing left to try.
            msg = (
                f"attempts exhausted ({job.attempt - 1} of {job.max_attempts}): the last"
                " one's worker stopped"
            )
            return self._dead(job, reg, "exhausted", msg, jlog, unrun=True)
        if log.debug_enabled():
            jlog.debug("job_started")
        if self.observer is not None or self.hook is not None:
            # Only a first attempt's wait means anything (a retry's includes its backoff).
            waited = (
                (self.clock.now() - job.created_at).total_seconds() if job.attempt == 1 else None
            )
            entry.waited = waited
            if self.hook is not None:
                self.hook(
                    "started",
                    {"job": job, "at": self.clock.monotonic(), "waited": waited or 0.0},
                )
        started = entry.began = self.clock.monotonic()
        try:
            await reg.handler(job)
        except asyncio.CancelledError as exc:
            if entry.why is None:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this task is being cancelled from outside: let it through
                # Raised by the handler itself (a future cancelled elsewhere, a
                # library's own cancellation), not a cancellation of this task: the
                # handler's failure, or its outcome would wait for the lease to run out.
                if job.completed_in_tx:
                    jlog.warning("job_failed_after_commit", error=_describe(exc))
                    return None
                return self._failed(job, reg, _describe(exc), jlog, exc)
            if entry.why == "timeout":
                return self._failed(job, reg, f"timed out after {entry.timeout:g}s", jlog)
            if entry.why == "lease_lost":
                jlog.warning("job_abandoned", reason="lease lost to another worker")
                return None
            jlog.info("job_released", reason=entry.why)
            return None if job.completed_in_tx else Release(key)
        except Snooze as s:
            run_at = self.clock.now() + timedelta(seconds=s.delay)
            jlog.debug("job_snoozed", delay=s.delay)
            if job.completed_in_tx:
                return None
            self.loops[job.queue].due_at(run_at)
            return Retry(key, run_at, None, None, refund=True)
        except PermanentFailure as exc:
            return self._dead(job, reg, "permanent", _describe(exc), jlog, exc=exc)
        except Cancel as exc:
            return self._dead(job, reg, "cancelled", _describe(exc), jlog, exc=exc)
        except Exception as exc:
            if job.completed_in_tx:
                # Its effects and completion already committed together; a failure
                # after that cannot be retried without doing them twice.
                jlog.warning("job_failed_after_commit", error=_describe(exc))
                return None
            return self._failed(job, reg, _describe(exc), jlog, exc)
        except BaseException as exc:
            # SystemExit (argparse or click inside a handler), KeyboardInterrupt: the
            # handler's failure, not a reason to end the process.
            if job.completed_in_tx:
                jlog.warning("job_failed_after_commit", error=_describe(exc))
                return None
            return self._failed(job, reg, _describe(exc), jlog, exc)
        if log.debug_enabled():
            elapsed_ms = round((self.clock.monotonic() - started) * 1e3, 3)
            jlog.debug("job_succeeded", duration_ms=elapsed_ms)
        return None if job.completed_in_tx else Complete(key)

    def _unknown_kind(self, job: Job, jlog: _JobLog, since: datetime | None) -> Outcome:
        """No handler here: another process may have one (a rolling deploy), so retry
        with backoff, the attempt refunded, until the kind has been unknown for
        `unknown_kind_retry` seconds."""
        key: JobKey = (job.tenant_id, job.id)
        now = self.clock.now()
        unknown_for = (now - since).total_seconds() if since is not None else 0.0
        msg = f"no handler registered for kind {safe_text(job.kind)!r} in worker {self.owner}"
        if unknown_for >= self.config.unknown_kind_retry:
            jlog.warning("job_dead", reason="unknown_kind", error=msg)
            return Bury(key, msg, self._error_obj(job, msg), "unknown_kind")
        delay = min(60.0, max(1.0, unknown_for / 4)) * (0.5 + self.rnd.random())
        run_at = now + timedelta(seconds=delay)
        jlog.warning("job_kind_unknown", error=msg, retry_in_s=round(delay, 3))
        return Retry(key, run_at, msg, self._error_obj(job, msg), refund=True, unknown_kind=True)

    def _dead(
        self,
        job: Job,
        reg: Registration | None,
        reason: str,
        msg: str,
        jlog: _JobLog,
        *,
        exc: BaseException | None = None,
        unrun: bool = False,
    ) -> Outcome:
        jlog.warning("job_dead", reason=reason, error=msg)
        return Bury(
            (job.tenant_id, job.id),
            msg,
            self._error_obj(job, msg, exc),
            reason,
            hook=reg.dead_hook_kind if reg is not None else None,
            unrun=unrun,
        )

    def _failed(
        self,
        job: Job,
        reg: Registration,
        msg: str,
        jlog: _JobLog,
        exc: BaseException | None = None,
    ) -> Outcome:
        if job.attempt >= job.max_attempts:
            return self._dead(job, reg, "exhausted", msg, jlog, exc=exc)
        policy = reg.policy
        delay = full_jitter(
            job.attempt, base=policy.backoff_base, cap=policy.backoff_cap, rnd=self.rnd
        )
        run_at = self.clock.now() + timedelta(seconds=delay)
        jlog.warning("job_failed", error=msg, retry_in_s=round(delay, 3))
        self.loops[job.queue].due_at(run_at)
        return Retry((job.tenant_id, job.id), run_at, msg, self._error_obj(job, msg, exc))

    def _error_obj(self, job: Job, msg: str, exc: BaseException | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "attempt": job.attempt,
            # Of how many: the dead job's effective max attempts (`dead show`) when its
            # row holds NULL for "the kind's policy".
            "max_attempts": job.max_attempts,
            "at": self.clock.now().isoformat(),
            "error": msg[:_ERROR_TEXT_MAX],
            "worker": self.owner,
        }
        if exc is not None:
            try:
                tb = "".join(traceback.format_exception(exc, limit=8))
            except Exception:  # an exception that cannot even be formatted
                tb = f"(no traceback: {type(exc).__name__} cannot be formatted)"
            obj["traceback"] = safe_text(tb)[-_ERROR_TEXT_MAX:]
        return obj

    def _flushed(self, outcomes: list[Outcome]) -> None:
        # Only the queues these outcomes belong to may have a tenant with room again.
        for queue in {self._outcome_queue.pop(o.key, None) for o in outcomes}:
            loop = self.loops.get(queue) if queue is not None else None
            if loop is not None:
                loop.outcomes_written()
        if self.hook is not None:
            self.hook("flushed", {"outcomes": outcomes})

    async def _watchdog(self) -> None:
        """Cancel jobs past their deadline; sleep until the earliest one.  start_job
        wakes it when a new job's deadline comes before that."""
        while True:
            now = self.clock.monotonic()
            nxt = math.inf
            for loop in self.loops.values():
                for entry in loop.running.values():
                    if entry.why is not None:
                        continue
                    if entry.deadline <= now:
                        entry.cancel("timeout")
                    else:
                        nxt = min(nxt, entry.deadline)
            self._watch_next = nxt
            self._watch_wake = anyio.Event()
            with anyio.move_on_after(nxt - now):
                await self._watch_wake.wait()

    # --- leases -------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        interval = self.config.lease_seconds / 3
        while True:
            await anyio.sleep(interval * (0.9 + 0.2 * self.rnd.random()))
            await self.heartbeat_once()

    async def heartbeat_once(self) -> int:
        """Extend every lease this worker holds; cancel jobs whose lease it lost."""
        held = [(k, r) for loop in self.loops.values() for k, r in loop.running.items()]
        waiting: list[JobKey] = [
            (row["tenant_id"], row["id"]) for loop in self.loops.values() for row in loop.ready
        ]
        keys = [k for k, _ in held] + waiting
        if not keys:
            return 0
        try:
            async with self.claim_pool.acquire() as conn:
                rows = await conn.fetch(
                    Q["extend_leases"],
                    [k[0] for k in keys],
                    [k[1] for k in keys],
                    self.owner,
                    self.config.lease_seconds,
                )
        except Exception as exc:
            self.log.warning("heartbeat_failed", error=safe_text(str(exc)), jobs=len(keys))
            return 0
        kept = {(r["tenant_id"], r["id"]) for r in rows}
        # A prefetched row whose lease was lost belongs to someone else now.  (Rows
        # claimed during the heartbeat were not asked about: keep them.)
        lost = set(waiting) - kept
        if lost:
            for loop in self.loops.values():
                loop.ready = deque(
                    row for row in loop.ready if (row["tenant_id"], row["id"]) not in lost
                )
        for key, r in held:
            # A job may have finished (and been flushed) since `held` was taken.
            if (
                key not in kept
                and key in self.loops[r.job.queue].running
                and not r.job.completed_in_tx
            ):
                r.cancel("lease_lost")
        return len(kept)


class _JobLog:
    """The worker's logger bound to one job, built only when a line is written: binding
    on every job start costs more than a no-op job."""

    __slots__ = ("_base", "_job")

    def __init__(self, base: Any, job: Job) -> None:
        self._base = base
        self._job = job

    def _bound(self) -> Any:
        j = self._job
        return self._base.bind(
            job_id=j.id,
            tenant_id=str(j.tenant_id),
            kind=safe_text(j.kind),
            attempt=j.attempt,
            queue=safe_text(j.queue),
        )

    def debug(self, event: str, **kw: Any) -> None:
        self._bound().debug(event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._bound().info(event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._bound().warning(event, **safe_json(kw))


def _describe(exc: BaseException) -> str:
    """`Type: message`, safe for a text column and a log line, whatever the exception's
    str() does."""
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception:
        text = "(its message cannot be printed)"
    return safe_text(f"{name}: {text}" if text else name)
