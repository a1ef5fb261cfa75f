"""The Prefect tasks of the flow (stages.py: prep, rollout, reward, update, checkpoint, evaluate); what they call lives in envs/, engines/ and runtime/."""
