-- Named statements of the tenants module, the only writer of tenantry.tenants and
-- tenantry.api_keys.  Every one runs in a tenant transaction (`tenant_tx`), under
-- row-level security, and names the tenant as well, so that the tenant predicate is
-- an index condition (a test EXPLAINs each of them).

-- name: create_tenant
INSERT INTO tenantry.tenants (id, slug, name, plan, state)
VALUES ($1::uuid, $2::text, $3::text, $4::text, $5::text)
RETURNING id, slug, name, plan, state, created_at

-- The tenant unless another holds the slug (no row then: provisioning tries its next
-- candidate).  A clash on the id still raises.
-- name: create_tenant_unless_slug_taken
INSERT INTO tenantry.tenants (id, slug, name, plan, state)
VALUES ($1::uuid, $2::text, $3::text, $4::text, $5::text)
ON CONFLICT (slug) DO NOTHING
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

-- Provisioning's building blocks: deterministic ids, and a repeat is a no-op.

-- name: add_user
INSERT INTO tenantry.users (tenant_id, id, email, display_name)
VALUES ($1::uuid, $2::uuid, $3::text, $4::text)
ON CONFLICT (tenant_id, id) DO NOTHING

-- name: add_roles
INSERT INTO tenantry.roles (tenant_id, name, permissions)
SELECT $1::uuid, r.name, string_to_array(r.permissions, ',')
  FROM unnest($2::text[], $3::text[]) AS r(name, permissions)
ON CONFLICT (tenant_id, name) DO NOTHING

-- A workspace with its first member, in one round trip (the membership's foreign key is
-- checked at the statement's end, when the workspace is there).
-- name: add_workspace_with_member
WITH ws AS (
    INSERT INTO tenantry.workspaces (tenant_id, id, slug, name)
    VALUES ($1::uuid, $2::uuid, $3::text, $4::text)
    ON CONFLICT (tenant_id, id) DO NOTHING
)
INSERT INTO tenantry.memberships (tenant_id, workspace_id, user_id, role)
VALUES ($1::uuid, $2::uuid, $5::uuid, $6::text)
ON CONFLICT (tenant_id, workspace_id, user_id) DO NOTHING

-- name: set_tenant_state
UPDATE tenantry.tenants t
   SET state = $2::text, updated_at = now()
 WHERE t.id = $1::uuid
RETURNING t.id

-- name: delete_tenant
DELETE FROM tenantry.tenants t WHERE t.id = $1::uuid RETURNING t.id

-- name: list_tenants
-- Across tenants: the operator's login only (tenantry.tenants_list in functions.sql).
SELECT l.id, l.slug, l.name, l.plan, l.state, l.created_at
  FROM tenantry.tenants_list($1::integer) l
