"""deploy/citus/distribute.sql against the real schema, on plain PostgreSQL.

Citus cannot be installed here, so its placement functions are stood in for by
recorders, and the rules Citus enforces when it distributes a table are checked
against the migrated schema's own catalog: every table placed once; every unique key
and foreign key of a distributed table carrying the distribution column; no
cross-tenant claim (FOR UPDATE SKIP LOCKED) and no NOTIFY trigger on a distributed
table.  What Citus would do at run time is not tested (docs/scaling.md)."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "citus" / "distribute.sql"

# Recorders with Citus's signatures.  They run as the admin who runs the script.
STAND_INS = """
CREATE TABLE public.citus_placed (how text, rel regclass, col text, colocate text);
CREATE FUNCTION public.create_reference_table(rel regclass) RETURNS void
LANGUAGE sql AS $$ INSERT INTO public.citus_placed VALUES ('reference', rel, NULL, NULL) $$;
CREATE FUNCTION public.create_distributed_table(rel regclass, col text,
                                                colocate_with text DEFAULT 'default')
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO public.citus_placed VALUES ('distributed', rel, col, colocate_with)
$$;
CREATE FUNCTION public.citus_add_local_table_to_metadata(rel regclass) RETURNS void
LANGUAGE sql AS $$ INSERT INTO public.citus_placed VALUES ('local', rel, NULL, NULL) $$;
CREATE TABLE public.citus_functions (fn regprocedure, arg text, colocate text);
CREATE FUNCTION public.create_distributed_function(fn regprocedure, arg text,
                                                   colocate_with text DEFAULT 'default')
RETURNS void
LANGUAGE sql AS $$ INSERT INTO public.citus_functions VALUES (fn, arg, colocate_with) $$;
"""


def script_statements() -> str:
    """The script as one simple-protocol batch: psql's meta-commands left out."""
    return "\n".join(line for line in SCRIPT.read_text().splitlines() if not line.startswith("\\"))


async def placed(conn: asyncpg.Connection) -> dict[str, tuple[str, str | None, str | None]]:
    rows = await conn.fetch("SELECT how, rel::text AS rel, col, colocate FROM public.citus_placed")
    seen: dict[str, tuple[str, str | None, str | None]] = {}
    for r in rows:
        assert r["rel"] not in seen, f"{r['rel']} placed twice"
        seen[r["rel"]] = (r["how"], r["col"], r["colocate"])
    return seen


async def test_without_citus_the_script_refuses_and_changes_nothing(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(asyncpg.RaiseError, match="not a Citus coordinator"):
            await conn.execute(script_statements())
        await conn.execute("ROLLBACK")
        setting = await conn.fetchval(
            "SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase"
            " WHERE d.datname = current_database()"
        )
        assert setting == 0
    finally:
        await conn.close()


async def test_the_distribution_script_places_every_table_by_citus_rules(
    database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(STAND_INS)
        await conn.execute(script_statements())
        where = await placed(conn)

        tables = {
            r["t"]
            for r in await conn.fetch(
                "SELECT c.oid::regclass::text AS t FROM pg_class c"
                " WHERE c.relnamespace IN ('tenantry'::regnamespace,"
                "                          'tenantry_analytics'::regnamespace)"
                "   AND c.relkind IN ('r', 'p')"
            )
        }
        assert set(where) == tables, "every table placed, and only tables"

        distributed = {t for t, (how, _, _) in where.items() if how == "distributed"}
        reference = {t for t, (how, _, _) in where.items() if how == "reference"}
        assert distributed and reference
        anchors = {t: colocate for t, (how, _, colocate) in where.items() if how == "distributed"}
        [anchor] = [t for t, colocate in anchors.items() if colocate == "default"]
        assert all(c in ("default", anchor) for c in anchors.values()), "one colocation group"
        assert all(where[t][1] == "tenant_id" for t in distributed)

        # Citus refuses a unique key or a foreign key of a distributed table without the
        # distribution column.
        keys = await conn.fetch(
            """SELECT i.indrelid::regclass::text AS t, i.indexrelid::regclass::text AS idx,
                      ARRAY(SELECT a.attname::text FROM pg_attribute a
                             WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey))
                        AS cols
                 FROM pg_index i
                WHERE i.indisunique OR i.indisexclusion"""
        )
        for k in keys:
            if k["t"] in distributed:
                assert "tenant_id" in k["cols"], f"{k['idx']} lacks the distribution column"
        fks = await conn.fetch(
            """SELECT c.conrelid::regclass::text AS t, c.confrelid::regclass::text AS target,
                      c.conname::text AS name,
                      ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
                              JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n
                             ORDER BY k.o) AS cols,
                      ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, o)
                              JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n
                             ORDER BY k.o) AS target_cols
                 FROM pg_constraint c
                WHERE c.contype = 'f' AND c.connamespace = 'tenantry'::regnamespace"""
        )
        assert fks
        for fk in fks:
            if fk["target"] in distributed:
                # to a distributed table: only from a colocated one, tenant to tenant
                assert fk["t"] in distributed, f"{fk['name']}: into a distributed table"
                pairs = dict(zip(fk["cols"], fk["target_cols"], strict=True))
                assert pairs.get("tenant_id") == "tenant_id", fk["name"]
            else:
                assert fk["target"] in reference or where[fk["target"]][0] == "local", fk["name"]
                if fk["t"] in distributed:
                    assert fk["target"] in reference, f"{fk['name']}: distributed to local"

        # The queue plane stays on the coordinator: no function that claims across
        # tenants (SKIP LOCKED) and no trigger that notifies touches a distributed table.
        bodies = await conn.fetch(
            """SELECT p.oid::regprocedure::text AS fn, p.prosrc AS src,
                      EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgfoid = p.oid) AS trigger
                 FROM pg_proc p WHERE p.pronamespace = 'tenantry'::regnamespace"""
        )
        claims = [b for b in bodies if "SKIP LOCKED" in b["src"]]
        notifiers = [b for b in bodies if b["trigger"] and "pg_notify" in b["src"]]
        assert claims and notifiers
        for b in claims + notifiers:
            touched = set(re.findall(r"tenantry\.([a-z_]+)", b["src"]))
            assert not {f"tenantry.{t}" for t in touched} & distributed, b["fn"]
        triggers = await conn.fetch(
            """SELECT g.tgrelid::regclass::text AS t, p.prosrc AS src
                 FROM pg_trigger g JOIN pg_proc p ON p.oid = g.tgfoid
                WHERE NOT g.tgisinternal"""
        )
        for trig in triggers:
            if "pg_notify" in trig["src"]:
                assert trig["t"] not in distributed, trig["t"]

        [fn] = await conn.fetch("SELECT fn::text, arg, colocate FROM public.citus_functions")
        assert fn["fn"] == "tenantry.onboarding_lock(uuid,uuid)"
        assert fn["colocate"] == anchor

        settings = await conn.fetchval(
            "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_database d"
            " ON d.oid = s.setdatabase WHERE d.datname = current_database()"
            " AND s.setrole = 0"
        )
        assert "citus.propagate_set_commands=local" in settings
    finally:
        await conn.close()
