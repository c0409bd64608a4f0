"""Benchmarks: `python -m bench.<name> [--json] [--quick]`, or all of them with
`python -m bench.all` (`make bench`).  Shared plumbing lives in `bench.common`."""
