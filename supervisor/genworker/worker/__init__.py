"""The worker process: one uvloop loop, one aiohttp session, jobs run by handlers.
Never imports the database driver."""
