-- genworker schema, version 2: the result cache (off unless --cache postgres).
-- A key is the sha256 of a canonical request (provider, model, prompt, size,
-- variation index); the result is the stored file (path, bytes, sha256, mime).

CREATE TABLE genworker.cache (
    key         text PRIMARY KEY,
    result      jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);

-- Pruning deletes expired rows oldest first.
CREATE INDEX cache_expires ON genworker.cache (expires_at);
