"""Where a run's work happens: ``local`` (this process, imgrank.features.pipeline) or ``ray``."""
