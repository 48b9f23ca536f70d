"""Benchmarks beside the product: `segpipe bench NAME` or `python -m benchmarks NAME` (not tests).

Each measures ours side by side with its anchor (MONAI, torch eager) in the same run and prints
ratios. No module of `pipeline` imports this package (tests/test_layers.py); `pipeline.cli` names it
only as the lazy entry of `segpipe bench`. Its own dependencies (OpenSlide for MONAI's streaming row)
are the `[bench]` extra: `pip install -e '.[bench]'`.
"""
