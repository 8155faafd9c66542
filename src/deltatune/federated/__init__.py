"""Federated deltas on Flower: clients train a delta on their own data, the server aggregates
the deltas (never the base), each client keeps a personal delta."""
