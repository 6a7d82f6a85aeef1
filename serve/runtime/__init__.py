"""The serving runtime: the HTTP app, the in-process and Ray transports, the graph."""
