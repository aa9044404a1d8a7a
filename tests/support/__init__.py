"""Reusable test helpers (servers, fakes) shared by several test modules."""
