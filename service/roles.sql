-- Statements about database roles (the login the service runs as).

-- name: login_risks
-- Everything that would let this login escape row-level security: being a superuser,
-- having BYPASSRLS, owning the schema or a table in it (an owner can disable or drop
-- the policies), or being able to become a role that can do any of that.
SELECT r.rolname AS login,
       r.rolsuper AS superuser,
       r.rolbypassrls AS bypassrls,
       EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n
                WHERE n.nspname = 'tenantry'
                  AND pg_catalog.pg_has_role(r.oid, n.nspowner, 'MEMBER'))
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                   WHERE c.relnamespace = 'tenantry'::regnamespace
                     AND pg_catalog.pg_has_role(r.oid, c.relowner, 'MEMBER')) AS owner,
       ARRAY(SELECT b.rolname::text FROM pg_catalog.pg_roles b
              WHERE b.oid <> r.oid AND (b.rolsuper OR b.rolbypassrls)
                AND pg_catalog.pg_has_role(r.oid, b.oid, 'MEMBER')
              ORDER BY b.rolname) AS can_become
  FROM pg_catalog.pg_roles r
 WHERE r.rolname = current_user

-- name: role_exists
SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1::text)

-- name: create_login
-- Identifiers and the (already hashed) password are quoted by format(), never by us.
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE INHERIT',
              $1::text)
       || CASE WHEN $2::text IS NULL THEN '' ELSE format(' PASSWORD %L', $2::text) END

-- name: grant_service
SELECT format('GRANT tenantry_service TO %I', $1::text)
