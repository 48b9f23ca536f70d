"""`python -m benchmarks NAME ...`: the same benchmarks as `segpipe bench NAME ...`."""

from pipeline.cli import main

if __name__ == "__main__":
    import sys

    raise SystemExit(main(["bench", *sys.argv[1:]]))
