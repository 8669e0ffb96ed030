"""Training students from a cache: the streaming reader, batching, and (next) the loop."""
