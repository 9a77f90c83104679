"""Edge runtime: read sensor streams, serve a compiled model, learn its head online."""

__version__ = "0.1.0"
