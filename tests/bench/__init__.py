"""`make bench`: throughput and latency figures, always beside a baseline from the same run."""
