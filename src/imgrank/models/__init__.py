"""Models: choosing, loading and running a ranking model (backbone, heads, runtimes)."""
