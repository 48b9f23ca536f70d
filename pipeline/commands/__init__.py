"""Parsers and handlers of the `segpipe` commands that are tools rather than DVC stages (the stages'
handlers stay in `pipeline/cli.py`, where tests/test_dvc_deps.py finds them); `pipeline.bench.commands`
holds the benchmarks'."""
