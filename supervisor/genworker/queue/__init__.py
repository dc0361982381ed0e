"""The job queue over PostgreSQL: schema and migrations, submit, claim, complete, leases,
the client apps use, and the result cache. Never imports the node, the workers or the API."""
