"""Throughput and latency benchmark for `textgen serve` against in-process `generate` and
`transformers serve`. Entry point: `python -m bench.run [--quick]`."""
