"""Running on a cluster: SLURM/local launch plans (`launch`) and per-GPU memory planning (`plan`)."""
