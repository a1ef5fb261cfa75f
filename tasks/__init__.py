"""The Prefect tasks of the flow (stages.py) and the GSM8K libraries they call (prep.py, reward.py)."""
