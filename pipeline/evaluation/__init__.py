"""The `evaluate` and `report` stages: test-split metrics, per-head scores, overlays, the report."""
