-- version: 1
-- The operations module's functions: operators of the dashboard, their one-time
-- sign-in links and sessions, and the audit trail of what they do.  A repeatable
-- migration (tenantry/migrate.py), applied again whenever this file changes (raise the
-- version above with every change).  The ops module is the only writer of
-- tenantry.operators, operator_links and operator_sessions.
--
-- Every function is SECURITY DEFINER, owned by tenantry_system, executable by
-- tenantry_operator only.  Keys, link tokens and session cookies arrive as their
-- SHA-256: the database never holds one that would sign someone in.

GRANT CREATE ON SCHEMA tenantry TO tenantry_system;

CREATE OR REPLACE FUNCTION tenantry.operator_add(op_name text, op_role text, op_key_hash bytea)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO tenantry.operators (name, role, key_hash) VALUES ($1, $2, $3);
END;
$$;

-- A new key for an operator (the old one stops working at once, and so do the
-- operator's sessions); and, with op_role, a new role.  False: no such operator.
CREATE OR REPLACE FUNCTION tenantry.operator_update(
    op_name text, op_role text, op_key_hash bytea, op_disabled boolean)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE tenantry.operators o
       SET role = coalesce($2, o.role),
           key_hash = coalesce($3, o.key_hash),
           disabled_at = CASE WHEN $4 IS NULL THEN o.disabled_at
                              WHEN $4 THEN coalesce(o.disabled_at, now()) END
     WHERE o.name = $1;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF $3 IS NOT NULL OR $4 OR $2 IS NOT NULL THEN
        DELETE FROM tenantry.operator_sessions s WHERE s.operator = $1;
        DELETE FROM tenantry.operator_links l WHERE l.operator = $1;
    END IF;
    RETURN true;
END;
$$;

CREATE OR REPLACE FUNCTION tenantry.operator_remove(op_name text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM tenantry.operators o WHERE o.name = $1;
    RETURN FOUND;
END;
$$;

CREATE OR REPLACE FUNCTION tenantry.operators_list()
RETURNS TABLE (name text, role text, created_at timestamptz, disabled_at timestamptz,
               sessions bigint, last_seen_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
SELECT o.name, o.role, o.created_at, o.disabled_at,
       (SELECT count(*) FROM tenantry.operator_sessions s
         WHERE s.operator = o.name AND s.expires_at > now()),
       (SELECT max(s.last_seen_at) FROM tenantry.operator_sessions s
         WHERE s.operator = o.name)
  FROM tenantry.operators o
 ORDER BY o.name;
END;
$$;

-- A one-time sign-in link for an enabled operator, good for ttl_seconds.  False: no
-- such operator, or disabled.  Expired and used links of the operator go meanwhile.
CREATE OR REPLACE FUNCTION tenantry.operator_link_create(
    op_name text, token_hash bytea, ttl_seconds integer)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM 1 FROM tenantry.operators o WHERE o.name = $1 AND o.disabled_at IS NULL;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM tenantry.operator_links l
     WHERE l.operator = $1 AND (l.used_at IS NOT NULL OR l.expires_at <= now());
    INSERT INTO tenantry.operator_links (token_hash, operator, expires_at)
    VALUES ($2, $1, now() + make_interval(secs => $3));
    RETURN true;
END;
$$;

-- Sign in with a key (key_hash) or a one-time link (link_hash): a new session with
-- its CSRF token, good for ttl_seconds.  No row: the key or link is unknown, used,
-- expired, or its operator disabled (the caller cannot tell which, and neither can
-- whoever guesses).  A link is used up by the statement that signs in with it: two
-- browsers racing on one link get one session between them.
CREATE OR REPLACE FUNCTION tenantry.operator_sign_in(
    key_hash bytea, link_hash bytea, session_hash bytea, csrf text, ttl_seconds integer)
RETURNS TABLE (name text, role text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    who text;
BEGIN
    IF $1 IS NOT NULL THEN
        SELECT o.name INTO who FROM tenantry.operators o
         WHERE o.key_hash = $1 AND o.disabled_at IS NULL;
    ELSE
        UPDATE tenantry.operator_links l
           SET used_at = now()
         WHERE l.token_hash = $2 AND l.used_at IS NULL AND l.expires_at > now()
           AND EXISTS (SELECT 1 FROM tenantry.operators o
                        WHERE o.name = l.operator AND o.disabled_at IS NULL)
        RETURNING l.operator INTO who;
    END IF;
    IF who IS NULL THEN
        RETURN;
    END IF;
    DELETE FROM tenantry.operator_sessions s WHERE s.operator = who AND s.expires_at <= now();
    INSERT INTO tenantry.operator_sessions (token_hash, operator, csrf, expires_at)
    VALUES ($3, who, $4, now() + make_interval(secs => $5));
    RETURN QUERY SELECT o.name, o.role FROM tenantry.operators o WHERE o.name = who;
END;
$$;

-- The operator behind a session cookie, with the session's CSRF token; no row: no
-- such session, expired, or its operator disabled.  last_seen_at is written at most
-- once a minute (a page and its stream ask on every request).
CREATE OR REPLACE FUNCTION tenantry.operator_session(session_hash bytea)
RETURNS TABLE (name text, role text, csrf text, expires_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    UPDATE tenantry.operator_sessions s
       SET last_seen_at = now()
     WHERE s.token_hash = $1 AND s.expires_at > now()
       AND s.last_seen_at < now() - interval '1 minute';
    RETURN QUERY
    SELECT o.name, o.role, s.csrf, s.expires_at
      FROM tenantry.operator_sessions s
      JOIN tenantry.operators o ON o.name = s.operator
     WHERE s.token_hash = $1 AND s.expires_at > now() AND o.disabled_at IS NULL;
END;
$$;

CREATE OR REPLACE FUNCTION tenantry.operator_sign_out(session_hash bytea)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM tenantry.operator_sessions s WHERE s.token_hash = $1;
    RETURN FOUND;
END;
$$;

-- The audit trail: one event per operator action in the outbox of the system tenant
-- (the nil uuid), aggregate `operator` / the operator's name, in the caller's
-- transaction (recorded if and only if the action commits).  Webhook endpoints and
-- event followers of the system tenant receive them like any other event.
CREATE OR REPLACE FUNCTION tenantry.operator_audit(
    actor text, action text, detail jsonb, affected bigint)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN tenantry.emit(
        '00000000-0000-0000-0000-000000000000'::uuid, 'operator', $1, 'operator.' || $2,
        jsonb_build_object('operator', $1, 'action', $2, 'detail', coalesce($3, '{}'),
                           'rows', $4));
END;
$$;

-- The audit trail, newest first, before the keyset cursor (an outbox id).
CREATE OR REPLACE FUNCTION tenantry.operator_audit_page(before_id bigint, max_rows integer)
RETURNS TABLE (id bigint, operator text, action text, detail jsonb, affected bigint,
               at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
SELECT o.id, o.aggregate_id, o.payload->>'action', o.payload->'detail',
       (o.payload->>'rows')::bigint, o.created_at
  FROM tenantry.outbox o
 WHERE o.tenant_id = '00000000-0000-0000-0000-000000000000'::uuid
   AND o.aggregate_type = 'operator'
   AND ($1 IS NULL OR o.id < $1)
 ORDER BY o.id DESC
 LIMIT $2;
END;
$$;

DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS sig
               FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'tenantry'::regnamespace AND p.prosecdef
                AND p.proname IN ('operator_add', 'operator_update', 'operator_remove',
                                  'operators_list', 'operator_link_create',
                                  'operator_sign_in', 'operator_session',
                                  'operator_sign_out', 'operator_audit',
                                  'operator_audit_page')
    LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO tenantry_system', f.sig);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.sig);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO tenantry_operator', f.sig);
    END LOOP;
END;
$$;

REVOKE CREATE ON SCHEMA tenantry FROM tenantry_system;
