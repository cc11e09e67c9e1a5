"""flexnsa profiling suite: per-branch latency and memory of the NSA op vs context length."""
