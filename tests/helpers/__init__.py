"""Shared test helpers: PTY pairs, a simulated modem, namespaces and polling."""
