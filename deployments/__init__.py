"""One module per model stage: a plain class that works without Ray, and a thin deployment."""
