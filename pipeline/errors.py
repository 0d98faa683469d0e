"""The one base class for errors whose message alone tells the user what to fix."""


class PipelineError(Exception):
    """Raised for bad input, missing data or weights, and cache problems; the CLI prints it as one line."""
