"""cot-hpc cluster layer: CLI, executor facade, shards, requeue, distributed env, status."""
