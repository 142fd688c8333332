"""Features: the one stream from image files to feature batches, and the cache behind it."""
