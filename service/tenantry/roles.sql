-- Statements about database roles (the login the service runs as).

-- name: login_risks
-- Everything that would let this login escape row-level security, or reach functions
-- not meant for it: being a superuser, having BYPASSRLS or CREATEROLE (which can grant
-- itself any role on PostgreSQL 15), owning the schema or a table in it (an owner can
-- disable or drop the policies), or being able to become a role that can do any of
-- that, read or write server files or every table, or call another login's functions ($1: the
-- tenantry roles this login is meant to hold).  Checked for the session user: a role
-- set with SET ROLE or a connection option can be left again with RESET ROLE.
SELECT s.rolname::text AS login,
       current_user::text AS acting_as,
       s.rolsuper AS superuser,
       s.rolbypassrls AS bypassrls,
       s.rolcreaterole AS createrole,
       ARRAY(SELECT b.rolname::text FROM pg_catalog.pg_roles b
              WHERE b.oid <> s.oid
                AND pg_catalog.pg_has_role(s.oid, b.oid, 'MEMBER')
                AND (b.rolsuper OR b.rolbypassrls OR b.rolcreaterole
                     OR b.rolname IN ('pg_read_server_files', 'pg_write_server_files',
                                      'pg_execute_server_program',
                                      -- every table, past its grants (and, with a
                                      -- tenant named by set_config, past the policies)
                                      'pg_read_all_data', 'pg_write_all_data')
                     OR (b.rolname LIKE 'tenantry\_%' AND b.rolname <> ALL ($1::text[])))
              ORDER BY b.rolname) AS can_become,
       EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n
                WHERE n.nspname = 'tenantry'
                  AND pg_catalog.pg_has_role(s.oid, n.nspowner, 'MEMBER'))
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                   WHERE c.relnamespace = 'tenantry'::regnamespace
                     AND pg_catalog.pg_has_role(s.oid, c.relowner, 'MEMBER')) AS owner
  FROM pg_catalog.pg_roles s
 WHERE s.rolname = session_user

-- name: role_exists
SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1::text)

-- name: other_tenantry_roles
-- The tenantry roles other than $2 that role $1 is a member of (empty for a role that
-- does not exist).
SELECT ARRAY(SELECT b.rolname::text
               FROM pg_catalog.pg_roles s, pg_catalog.pg_roles b
              WHERE s.rolname = $1::text AND b.oid <> s.oid
                AND pg_catalog.pg_has_role(s.oid, b.oid, 'MEMBER')
                AND b.rolname LIKE 'tenantry\_%' AND b.rolname <> ALL ($2::text[])
              ORDER BY b.rolname)

-- name: create_login
-- Identifiers and the (already hashed) password are quoted by format(), never by us.
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE INHERIT',
              $1::text)
       || CASE WHEN $2::text IS NULL THEN '' ELSE format(' PASSWORD %L', $2::text) END

-- name: grant_roles
SELECT format('GRANT %s TO %I',
              (SELECT string_agg(quote_ident(r), ', ') FROM unnest($2::text[]) r), $1::text)

-- name: reachable_relations
-- The schema's tables, views and sequences this login can read or write, by any grant
-- (its own, a role's, PUBLIC's, a predefined role's): for a login that should reach
-- none (the metrics login's only way in is tenantry.worker_demand).
SELECT c.oid::regclass::text AS name
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname IN ('tenantry', 'tenantry_analytics')
   AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
   AND (pg_catalog.has_table_privilege(c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE')
        OR (c.relkind = 'S' AND pg_catalog.has_sequence_privilege(c.oid, 'USAGE, SELECT, UPDATE')))
 ORDER BY 1
