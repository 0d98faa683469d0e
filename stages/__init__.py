"""Thin entry points, one per stage: `python -m stages.NAME [--config ...]` (logic lives in pipeline/)."""
