"""Outpost's shared contract: wire types, the one REST API app, errors, and NATS plumbing.

This package is the bottom layer; it imports neither ``edge_agent`` nor ``core_hub``.
"""

__version__ = "0.1.0"
