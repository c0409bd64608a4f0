-- Named statements of the tenants module, the only writer of tenantry.tenants and
-- tenantry.api_keys.  Every one runs in a tenant transaction (`tenant_tx`), under
-- row-level security, and names the tenant as well, so that the tenant predicate is
-- an index condition (a test EXPLAINs each of them).

-- name: create_tenant
INSERT INTO tenantry.tenants (id, slug, name, plan, state)
VALUES ($1::uuid, $2::text, $3::text, $4::text, $5::text)
RETURNING id, slug, name, plan, state, created_at

-- name: get_tenant
SELECT t.id, t.slug, t.name, t.plan, t.state, t.created_at
  FROM tenantry.tenants t
 WHERE t.id = $1::uuid

-- name: create_key
INSERT INTO tenantry.api_keys (tenant_id, name, secret_hash)
VALUES ($1::uuid, $2::text, $3::bytea)
RETURNING id

-- name: find_key
SELECT k.id
  FROM tenantry.api_keys k
 WHERE k.tenant_id = $1::uuid AND k.secret_hash = $2::bytea AND k.revoked_at IS NULL

-- name: list_keys
SELECT k.id, k.name, k.created_at, k.revoked_at
  FROM tenantry.api_keys k
 WHERE k.tenant_id = $1::uuid
 ORDER BY k.id

-- name: revoke_key
UPDATE tenantry.api_keys k
   SET revoked_at = coalesce(k.revoked_at, now())
 WHERE k.tenant_id = $1::uuid AND k.id = $2::bigint
RETURNING k.id

-- name: delete_tenant
DELETE FROM tenantry.tenants t WHERE t.id = $1::uuid RETURNING t.id

-- name: list_tenants
-- Across tenants: the operator's login only (tenantry.tenants_list in functions.sql).
SELECT l.id, l.slug, l.name, l.plan, l.state, l.created_at
  FROM tenantry.tenants_list($1::integer) l
