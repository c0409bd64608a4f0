-- version: 1
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

REVOKE CREATE ON SCHEMA tenantry FROM tenantry_system;
