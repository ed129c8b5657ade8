"""HTTP serving with Ray Serve: request validation, in-replica batching, the model
deployments (task subsets, the full model, expert-parallel workers) and the gateway.
`launch.serve` is the entry point; docs/SERVING.md the guide."""
