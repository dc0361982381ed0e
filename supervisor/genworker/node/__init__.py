"""The supervisor process: fork and watch workers, claim and dispatch jobs, write outcomes,
keep leases, and act on signals. The only process that holds database connections."""
