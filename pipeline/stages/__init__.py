"""Stage definitions, one module per stage: its code version, plan, build and registration.

Library modules never import this package (tests/test_imports.py); the runner loads its modules by
name from `graph.STAGE_MODULES`, and what other modules call lives in the library.
"""
