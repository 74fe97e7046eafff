"""The fleet side: several servers sharing one PostgreSQL (README "A fleet in PostgreSQL").

`db.py` owns the connection (the pool, reachability, the schema check) and `schema.py` the
tables and their migrations; every other module here speaks SQL through `FleetDB.connection()`,
so PostgreSQL is touched only from this package. A node never blocks on the database: what it
must send waits in its durable outbox (daemon/store/outbox.py) until the database is back.
"""
