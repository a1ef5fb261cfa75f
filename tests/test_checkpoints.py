"""Atomic, checksummed checkpoints: a damaged newest one is detected and the previous one used."""
import errno
import json
import logging

import pytest

from tasks import checkpoints as ck


def _fill(payload: bytes):
    def fill(tmp):
        (tmp / "actor").mkdir(parents=True)
        (tmp / "actor" / "model.safetensors").write_bytes(payload)
        (tmp / "actor" / "optim.pt").write_bytes(payload[::-1])
    return fill


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "ckpt"
    ck.write(r, 1, _fill(b"one" * 1000))
    ck.write(r, 2, _fill(b"two" * 1000))
    return r


def test_layout_manifest_and_latest(root):
    assert ck.read_latest(root) == 2
    manifest = json.loads((root / "global_step_2" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"actor/model.safetensors", "actor/optim.pt"}
    assert manifest["files"]["actor/optim.pt"]["size"] == 3000
    assert ck.verify(root / "global_step_2") is None
    assert ck.newest_valid(root) == root / "global_step_2"
    assert not list(root.glob(".*tmp"))


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-10])


def _flip(p):
    data = bytearray(p.read_bytes())
    data[100] ^= 0x01
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,reason", [
    (lambda d: _truncate(d / "actor" / "model.safetensors"), "bytes, manifest says"),
    (lambda d: _flip(d / "actor" / "optim.pt"), "checksum mismatch"),
    (lambda d: (d / "manifest.json").unlink(), "manifest.json missing"),
    (lambda d: (d / "actor" / "optim.pt").unlink(), "optim.pt missing"),
])
def test_damaged_newest_checkpoint_falls_back_to_previous(root, damage, reason, caplog):
    damage(root / "global_step_2")
    assert reason in ck.verify(root / "global_step_2")
    with caplog.at_level(logging.WARNING):
        assert ck.newest_valid(root) == root / "global_step_1"
    assert "global_step_2" in caplog.text and reason in caplog.text


def test_failed_write_leaves_previous_intact(root):
    def disk_full(tmp):
        (tmp / "actor").mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"global_step_3 .* failed .*previous checkpoint \(2\) is intact"):
        ck.write(root, 3, disk_full)
    assert ck.read_latest(root) == 2 and not (root / "global_step_3").exists()
    assert not list(root.glob(".global_step_3*")) and ck.newest_valid(root) == root / "global_step_2"


def test_keep_newest_k(tmp_path):
    r = tmp_path / "ckpt"
    for step in range(1, 5):
        ck.write(r, step, _fill(bytes([step]) * 10), keep=2)
    assert sorted(p.name for p in r.glob("global_step_*")) == ["global_step_3", "global_step_4"]


def test_no_checkpoint_yet(tmp_path):
    assert ck.newest_valid(tmp_path / "nothing") is None
