-- The catalog view the snapshot test compares: tables with their columns, constraints,
-- indexes, triggers and function bodies in the tenantry schema, and the security around
-- them (row-level security, policies, owners, privileges), one line each.
SELECT line FROM (
    SELECT 'column ' || c.relname || '.' || a.attname || ' ' ||
           format_type(a.atttypid, a.atttypmod) ||
           CASE WHEN a.attnotnull THEN ' not null' ELSE '' END ||
           coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '') AS line
      FROM pg_attribute a
      JOIN pg_class c ON c.oid = a.attrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE n.nspname = 'tenantry' AND c.relkind = 'r' AND a.attnum > 0
       AND NOT a.attisdropped
    UNION ALL
    SELECT 'constraint ' || c.relname || '.' || k.conname || ' ' || pg_get_constraintdef(k.oid)
      FROM pg_constraint k
      JOIN pg_class c ON c.oid = k.conrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'tenantry' AND k.contype <> 'n'
    UNION ALL
    SELECT 'index ' || pg_get_indexdef(i.indexrelid)
      FROM pg_index i
      JOIN pg_class c ON c.oid = i.indrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'tenantry'
    UNION ALL
    SELECT 'trigger ' || pg_get_triggerdef(t.oid)
      FROM pg_trigger t
      JOIN pg_class c ON c.oid = t.tgrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'tenantry' AND NOT t.tgisinternal
    UNION ALL
    SELECT 'function ' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) ||
           ') body md5 ' || md5(p.prosrc) || ' owner ' || pg_get_userbyid(p.proowner) ||
           CASE WHEN p.prosecdef THEN ' security definer' ELSE '' END ||
           ' acl ' || coalesce(array_to_string(p.proacl, ','), 'default')
      FROM pg_proc p
      JOIN pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname = 'tenantry'
    UNION ALL
    SELECT 'reloptions ' || c.relname || ' ' || array_to_string(c.reloptions, ',')
      FROM pg_class c
      JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'tenantry' AND c.reloptions IS NOT NULL
    UNION ALL
    SELECT 'relation ' || c.relname || ' kind ' || c.relkind::text || ' owner ' ||
           pg_get_userbyid(c.relowner) ||
           CASE WHEN c.relrowsecurity THEN ' rls' ELSE '' END ||
           CASE WHEN c.relforcerowsecurity THEN ' forced' ELSE '' END ||
           -- PostgreSQL 17 added MAINTAIN (m) to an owner's privileges; the snapshot
           -- must read the same on every supported version.
           ' acl ' || coalesce(replace(array_to_string(c.relacl, ','), 'arwdDxtm/', 'arwdDxt/'),
                               'default')
      FROM pg_class c
      JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'tenantry' AND c.relkind IN ('r', 'v', 'm')
    UNION ALL
    -- Column privileges (tenant code may insert a job's enqueue columns only).
    SELECT 'column acl ' || c.relname || '.' || a.attname || ' ' ||
           array_to_string(a.attacl, ',')
      FROM pg_attribute a
      JOIN pg_class c ON c.oid = a.attrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'tenantry' AND a.attnum > 0 AND a.attacl IS NOT NULL
    UNION ALL
    SELECT 'policy ' || c.relname || '.' || p.polname ||
           CASE WHEN p.polpermissive THEN ' permissive' ELSE ' restrictive' END ||
           ' cmd ' || p.polcmd::text ||
           ' to ' || coalesce((SELECT string_agg(CASE WHEN r = 0 THEN 'public'
                                                      ELSE pg_get_userbyid(r) END, ',')
                                 FROM unnest(p.polroles) r), '') ||
           ' using ' || coalesce(pg_get_expr(p.polqual, p.polrelid), '-') ||
           ' check ' || coalesce(pg_get_expr(p.polwithcheck, p.polrelid), '-')
      FROM pg_policy p
      JOIN pg_class c ON c.oid = p.polrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'tenantry'
    UNION ALL
    SELECT 'schema tenantry owner ' || pg_get_userbyid(n.nspowner) || ' acl ' ||
           coalesce(array_to_string(n.nspacl, ','), 'default')
      FROM pg_namespace n
     WHERE n.nspname = 'tenantry'
) s
ORDER BY line
