"""What runs on the workers: the trainer backends, rollout engines, the weight sync between them, one rank (worker.py) and the Ray group of ranks (worker_group.py); no Prefect, no MLflow."""
