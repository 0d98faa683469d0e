"""Thin entry points, one per stage: `python -m stages.NAME [--config ...]` (logic lives in pipeline/).

Each runs only under `if __name__ == "__main__"`: a worker process started with "spawn" (the curves
stage's [curves] workers) imports the main module again, and must not start the stage a second time.
"""
