"""cot-hpc's cluster layer: CLI, typed config, backends, stages, run folder, shards, status."""
