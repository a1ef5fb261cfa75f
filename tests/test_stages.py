"""Pure pieces of the stages: which rows a step trains on, and which failures are retried."""
import numpy as np
from prefect.states import Failed

from configs.load import load_config
from tasks.stages import step_rows, transient


def test_step_rows_cover_each_epoch_once_and_are_reproducible():
    cfg = load_config("tiny-cpu", ["data.train_batch_size=4"])
    n = 10  # 2 full batches per epoch; the 2 leftover rows of each epoch are dropped
    epoch1 = np.concatenate([step_rows(n, cfg, s) for s in (1, 2)])
    epoch2 = np.concatenate([step_rows(n, cfg, s) for s in (3, 4)])
    assert len(set(epoch1)) == 8 and len(set(epoch2)) == 8
    assert not np.array_equal(epoch1, epoch2)  # reshuffled each epoch
    assert np.array_equal(step_rows(n, cfg, 3), step_rows(n, cfg, 3))  # a resumed step sees the same rows
    off = load_config("tiny-cpu", ["data.train_batch_size=4", "data.shuffle=false"])
    assert step_rows(n, off, 2).tolist() == [4, 5, 6, 7] and step_rows(n, off, 3).tolist() == [0, 1, 2, 3]


def test_only_infrastructure_failures_are_retried():
    assert transient(None, None, Failed(data=RuntimeError("actor died"))) is True
    assert transient(None, None, Failed(data=ValueError("data.source=x: path does not exist"))) is False
