"""Analytics on a read replica: materialised views refreshed on the primary, read by
the analyst's login on a standby."""
