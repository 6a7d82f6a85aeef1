"""The qaserve SDK and the wire schema shared with the server (no torch, no ray)."""

__version__ = "0.1.0"
