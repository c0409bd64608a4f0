"""The numbered migrations (NNNN_name.sql), shipped inside the package as
`tenantry.schema`: `tenantry migrate` reads them from here (see tenantry/migrate.py)."""
