"""Parallelism: the one mesh factory and sharding rules (sharding.py), multi-host helpers
(distributed.py)."""
