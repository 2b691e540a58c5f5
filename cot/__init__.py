"""Core chain-of-thought ML code: data, answers, training and evaluation (cluster-agnostic)."""
