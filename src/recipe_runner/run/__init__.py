"""Run orchestration: the run folder, stages, lock file, plan, diff and reproduce."""
