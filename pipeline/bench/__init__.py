"""`segpipe bench ...`: benchmarks side by side with their anchors (MONAI, torch eager); not tests."""
