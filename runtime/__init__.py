"""Run-time libraries of the controller: checkpoint directories (atomic, checksummed), atomic file
writes, MLflow tracking, the step's timed stages and the kill/hang points of the fault tests."""
