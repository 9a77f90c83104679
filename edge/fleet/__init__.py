"""Fleet sync: delta codec, signing keys, aggregation math, stores, the server and the device client.

See DESIGN.md "Fleet sync" and ``edge/fleet/FORMAT.md``.
"""
