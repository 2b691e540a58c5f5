"""One submitit callable per stage: thin glue from a config to cot/ functions."""
