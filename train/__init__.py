"""Training: torchrun launcher with FSDP2 + per-layer torch.compile (issue 6; not built yet).

Until it lands, a converted model trains on CPU with NSAConfig(backend="reference") in any
ordinary loop (tests/test_module.py shows the op's backward)."""
