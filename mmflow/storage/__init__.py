"""Where results live: cell ids and folders (`store`), atomic files, per-cell locks, the result
schemas, object-store URIs, the relay that streams a worker's writes to the driver, and secrets kept
out of everything written."""
