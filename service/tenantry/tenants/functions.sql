-- version: 2
-- The tenants module's functions.  A repeatable migration (tenantry/migrate.py),
-- applied again whenever this file changes (raise the version above with every
-- change).

GRANT CREATE ON SCHEMA tenantry TO tenantry_system;

-- Every tenant, newest first, for operators (`tenantry tenants list`): across tenants,
-- so it runs as tenantry_system (which bypasses row-level security) and only the
-- operator's role may call it.  Reading is all it needs of the table.
GRANT SELECT ON tenantry.tenants TO tenantry_system;

CREATE OR REPLACE FUNCTION tenantry.tenants_list(max_rows integer)
RETURNS TABLE (id uuid, slug text, name text, plan text, state text, created_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
SELECT t.id, t.slug, t.name, t.plan, t.state, t.created_at
  FROM tenantry.tenants t
 ORDER BY t.created_at DESC, t.id
 LIMIT $1::integer;
END;
$$;

ALTER FUNCTION tenantry.tenants_list(integer) OWNER TO tenantry_system;
REVOKE ALL ON FUNCTION tenantry.tenants_list(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenantry.tenants_list(integer) TO tenantry_operator;

-- Provisioning's building blocks (the statements of queries.sql call them too, so each
-- is written once): deterministic ids, and a repeat is a no-op.  The caller's rights:
-- row-level security applies, in the caller's tenant context.  Provisioning calls them
-- from one function per group of steps (tenantry.onboarding_run_steps), so a group is
-- one round trip.

-- The tenant, in state `provisioning`, with the first of the candidate slugs no other
-- tenant holds; NULL when every one is taken.  ON CONFLICT (slug): a taken slug neither
-- raises nor aborts the transaction, so no savepoint around each try.  A clash on the
-- id still raises.
CREATE OR REPLACE FUNCTION tenantry.tenant_create_with_free_slug(
    for_tenant uuid, slugs text[], tenant_name text, tenant_plan text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    candidate text;
BEGIN
    FOREACH candidate IN ARRAY slugs LOOP
        INSERT INTO tenantry.tenants (id, slug, name, plan, state)
        VALUES (for_tenant, candidate, tenant_name, tenant_plan, 'provisioning')
        ON CONFLICT (slug) DO NOTHING;
        IF FOUND THEN
            RETURN candidate;
        END IF;
    END LOOP;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION tenantry.tenant_add_user(
    for_tenant uuid, user_id uuid, user_email text, display_name text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
INSERT INTO tenantry.users (tenant_id, id, email, display_name)
VALUES (for_tenant, user_id, user_email, display_name)
ON CONFLICT (tenant_id, id) DO NOTHING
$$;

-- Roles by name, each with its permissions as one comma-separated text (the arrays are
-- parallel).
CREATE OR REPLACE FUNCTION tenantry.tenant_add_roles(
    for_tenant uuid, role_names text[], role_permissions text[])
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
INSERT INTO tenantry.roles (tenant_id, name, permissions)
SELECT for_tenant, r.name, string_to_array(r.permissions, ',')
  FROM unnest(role_names, role_permissions) AS r(name, permissions)
ON CONFLICT (tenant_id, name) DO NOTHING
$$;

-- A workspace with its first member, in one statement (the membership's foreign key is
-- checked at the statement's end, when the workspace is there).
CREATE OR REPLACE FUNCTION tenantry.tenant_add_workspace_with_member(
    for_tenant uuid, workspace_id uuid, workspace_slug text, workspace_name text,
    member_id uuid, member_role text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
WITH ws AS (
    INSERT INTO tenantry.workspaces (tenant_id, id, slug, name)
    VALUES (for_tenant, workspace_id, workspace_slug, workspace_name)
    ON CONFLICT (tenant_id, id) DO NOTHING
)
INSERT INTO tenantry.memberships (tenant_id, workspace_id, user_id, role)
VALUES (for_tenant, workspace_id, member_id, member_role)
ON CONFLICT (tenant_id, workspace_id, user_id) DO NOTHING
$$;

-- False when there is no such tenant (in the caller's context).
CREATE OR REPLACE FUNCTION tenantry.tenant_set_state(for_tenant uuid, new_state text)
RETURNS boolean
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
WITH changed AS (
    UPDATE tenantry.tenants t
       SET state = new_state, updated_at = now()
     WHERE t.id = for_tenant
    RETURNING t.id
)
SELECT count(*) > 0 FROM changed
$$;

ALTER FUNCTION tenantry.tenant_create_with_free_slug(uuid, text[], text, text)
    OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.tenant_add_user(uuid, uuid, text, text) OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.tenant_add_roles(uuid, text[], text[]) OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.tenant_add_workspace_with_member(uuid, uuid, text, text, uuid, text)
    OWNER TO tenantry_owner;
ALTER FUNCTION tenantry.tenant_set_state(uuid, text) OWNER TO tenantry_owner;
REVOKE ALL ON FUNCTION tenantry.tenant_create_with_free_slug(uuid, text[], text, text),
                       tenantry.tenant_add_user(uuid, uuid, text, text),
                       tenantry.tenant_add_roles(uuid, text[], text[]),
                       tenantry.tenant_add_workspace_with_member(uuid, uuid, text, text, uuid,
                                                                 text),
                       tenantry.tenant_set_state(uuid, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenantry.tenant_create_with_free_slug(uuid, text[], text, text),
                          tenantry.tenant_add_user(uuid, uuid, text, text),
                          tenantry.tenant_add_roles(uuid, text[], text[]),
                          tenantry.tenant_add_workspace_with_member(uuid, uuid, text, text,
                                                                    uuid, text),
                          tenantry.tenant_set_state(uuid, text)
    TO tenantry_service;

REVOKE CREATE ON SCHEMA tenantry FROM tenantry_system;
