"""The entries of the `segpipe` commands that are DVC stages (download, prepare, train, evaluate,
report) or the user's inference (infer, export): one module each, mapped by `pipeline.cli.COMMANDS`.

An entry parses its command line, reads its configs/ files into typed settings (`read_config`) and
calls the library with values; nothing below the entries opens configs/ (tests/test_layers.py).
"""
