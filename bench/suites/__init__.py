"""The ``hmmgpu bench`` suites: one module per suite, each with NAME, DESCRIPTION and run(ctx)."""
