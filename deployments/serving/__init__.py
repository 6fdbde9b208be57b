"""Serving logic: the shared core (``core``), and per API the translation of its requests and events."""
