-- Named statements of the ops module, the only writer of tenantry.operators,
-- operator_links and operator_sessions.  Each calls a function of functions.sql
-- (beside this file), where the SQL and its reasoning live.

-- name: operator_add
SELECT tenantry.operator_add($1::text, $2::text, $3::bytea)

-- name: operator_update
SELECT tenantry.operator_update($1::text, $2::text, $3::bytea, $4::boolean)

-- name: operator_remove
SELECT tenantry.operator_remove($1::text)

-- name: operators_list
SELECT name, role, created_at, disabled_at, sessions, last_seen_at
  FROM tenantry.operators_list()

-- name: link_create
SELECT tenantry.operator_link_create($1::text, $2::bytea, $3::integer)

-- name: sign_in
SELECT name, role FROM tenantry.operator_sign_in($1::bytea, $2::bytea, $3::bytea, $4::text,
                                                 $5::integer)

-- name: session
SELECT name, role, csrf, expires_at FROM tenantry.operator_session($1::bytea)

-- name: sign_out
SELECT tenantry.operator_sign_out($1::bytea)

-- name: audit
SELECT tenantry.operator_audit($1::text, $2::text, $3::jsonb, $4::bigint)

-- name: audit_page
SELECT id, operator, action, detail, affected, at
  FROM tenantry.operator_audit_page($1::bigint, $2::integer)
