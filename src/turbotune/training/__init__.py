"""The training layer: the step engine (CUDA graphs, packing, padding removal, the automatic
checkpointing plan), turbotune's Trainer, checkpoints, the log, the run configuration and the hook
that gives Hugging Face trainers the fast step. Imports nothing from bench/, health/ or cli/."""
