"""What the daemon keeps on disk, one module per store; nothing else opens these files.

- `state`: the state file (state.json snapshot + state.journal + backups/): keys, their
  cumulative totals and the kernel readings those totals are based on. The source of truth.
- `history`: usage history in SQLite (history.sqlite3), per key per hour and day, and the fleet
  reports other servers push; agrees exactly with the state file.
- `outbox`: durable outboxes (outbox/, reports/): messages waiting to be sent, one file each.
- `usage`: what the poll loop hands to history and fleet reports (`UsageDelta`), and the
  stage/commit/recover protocol (`UsageSink`) that keeps every sink in step with the state file.
"""
