-- Named statements of the outbox module, the only writer of tenantry.outbox (besides
-- other services calling tenantry.emit in their own transactions).  The functions
-- they call are in functions.sql beside this file.

-- name: append
SELECT tenantry.emit($1::uuid, $2::text, $3::text, $4::text, $5::jsonb, $6::integer)

-- The events of one aggregate after a version, in the tenant's context (a replay).
-- name: events_after
SELECT o.version, o.event_type,
       tenantry.event_data(o.payload, o.event_type, o.version, o.created_at) AS data
  FROM tenantry.outbox o
 WHERE o.tenant_id = $1::uuid AND o.aggregate_type = $2::text AND o.aggregate_id = $3::text
   AND o.version > $4::integer
 ORDER BY o.version
 LIMIT $5::integer

-- The follower's reads also say when the server last lost its shared state: a crash's
-- recovery resets its statistics (the archiver's, as the others), and may have lost the
-- latest transactions, whose ids it hands out again (store.py, Position).  As seconds
-- since 1970: a timestamp's text follows the session's TimeZone and DateStyle, and
-- differed between two connections of one server.
-- name: follow
SELECT f.snapshot, f.tenant_id, f.aggregate_id, f.version, f.event_type, f.data,
       coalesce(extract(epoch FROM a.stats_reset)::text, '') AS server_epoch
  FROM tenantry.outbox_follow($1::text, $2::text) f, pg_catalog.pg_stat_archiver a

-- name: snapshot
SELECT pg_current_snapshot()::text AS snapshot,
       coalesce((SELECT extract(epoch FROM a.stats_reset)::text
                   FROM pg_catalog.pg_stat_archiver a), '') AS server_epoch

-- name: prune
SELECT tenantry.prune_outbox($1::integer, $2::integer)
