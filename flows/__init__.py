"""The Prefect flows (grpo, eval), their preflight checks and the `grpo` CLI; nothing of CUDA."""
