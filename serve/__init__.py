"""qaserve: question answering over your documents as a Ray Serve graph."""

__version__ = "0.1.0"
