-- Named statements of the metrics' database reads (tenantry/metrics.py): the functions
-- they call are the jobs' and the webhooks' own (their functions.sql).

-- name: queue_depth
SELECT queue, queued, scheduled, running, oldest_queued_at, heads
  FROM tenantry.queue_depth($1::text[], $2::integer, $3::integer)

-- name: webhook_gauges
SELECT pending, sending, dead, open_circuits, disabled_endpoints
  FROM tenantry.webhook_gauges($1::integer)

-- name: fanout_lag
SELECT events, oldest FROM tenantry.webhook_fanout_lag($1::integer)
