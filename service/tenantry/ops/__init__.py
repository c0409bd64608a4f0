"""Operations: the dashboard at /ops, its operators and sessions, queue controls and
the audit trail of every operator action."""
