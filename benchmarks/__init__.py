"""udpx's benchmark suite: ``pytest benchmarks`` (see README.md here)."""
