"""`turbotune bench`: the harness, one worker process per method, reports."""
