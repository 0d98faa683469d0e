"""The base class for errors whose message alone tells the user what to fix, and the cache's."""


class PipelineError(Exception):
    """Raised for bad input, missing data or weights, and cache problems; the CLI prints it as one line."""


class CacheError(PipelineError, RuntimeError):
    """A cache operation that cannot proceed (lock timeout, unwritable folder, disk full)."""
