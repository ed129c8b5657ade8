"""The training side of the entry points: the one loop (`loop.run_training`), what it
minimises (`objectives`), who turns gradients into updates (`engines`, `deepspeed`,
`optim`, `gradients`), the compiled step (`compile`), evaluation, step logging,
tracking, checkpointing, the host allocator, and the distillation run
(`distillation`), which is a training run with another objective."""
