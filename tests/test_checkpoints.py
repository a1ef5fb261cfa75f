"""Atomic, checksummed checkpoints: a damaged newest one is detected and the previous one used."""

import errno
import json
import logging
from pathlib import Path

import pytest

from runtime import checkpoints as ck


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


@pytest.mark.parametrize(
    "damage,reason",
    [
        (lambda d: _truncate(d / "actor" / "model.safetensors"), "bytes, manifest says"),
        (lambda d: _flip(d / "actor" / "optim.pt"), "checksum mismatch"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json missing"),
        (lambda d: (d / "actor" / "optim.pt").unlink(), "optim.pt missing"),
    ],
)
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


def test_keep_never_deletes_the_checkpoint_just_written(tmp_path):
    """Issue 13 fault 1: a run writes 3 and 4; a new run in the same folder (resume_mode=disable)
    writes 1. Step 1 stays, is `latest` and is what a resume finds; the older run's 3 and 4 are
    another lineage: neither rotated away nor resumed from."""
    r = tmp_path / "ckpt"
    for step in (3, 4, 1):
        ck.write(r, step, _fill(bytes([step]) * 10), keep=2)
    assert sorted(p.name for p in r.glob("global_step_*")) == ["global_step_1", "global_step_3", "global_step_4"]
    assert ck.read_latest(r) == 1 and ck.newest_valid(r) == r / "global_step_1"
    # The new run goes on: its own checkpoints rotate, the older run's higher steps are overwritten.
    for step in (2, 3):
        ck.write(r, step, _fill(bytes([100 + step]) * 10), keep=2)
    assert sorted(p.name for p in r.glob("global_step_*")) == ["global_step_2", "global_step_3", "global_step_4"]
    assert (r / "global_step_3" / "actor" / "optim.pt").read_bytes() == bytes([103]) * 10
    assert ck.newest_valid(r) == r / "global_step_3"


def test_rotation_keeps_this_runs_newest_by_write_order(tmp_path):
    """An earlier run saved every step (1..6); this run saves steps 2 and 4 with keep=2: at step 4
    the newest two it wrote are kept, the older run's 1 and 3 (written before) go, 5 and 6 stay."""
    r = tmp_path / "ckpt"
    for step in range(1, 7):
        ck.write(r, step, _fill(b"old" * 10))
    for step in (2, 4):
        ck.write(r, step, _fill(b"new" * 10), keep=2)
    assert sorted(ck._steps(r)) == [2, 4, 5, 6]


def test_foreign_directories_are_neither_resumed_nor_rotated(root):
    for name in ("global_step_9.bak", "global_step_x", "global_step_"):
        (root / name).mkdir()
    (root / "global_step_7").write_text("a file, not a checkpoint")
    assert ck.newest_valid(root) == root / "global_step_2"
    ck.write(root, 3, _fill(b"three" * 100), keep=1)
    assert ck.newest_valid(root) == root / "global_step_3"
    assert {p.name for p in root.iterdir() if not p.name.startswith(("latest", "global_step_3"))} == {
        "global_step_9.bak",
        "global_step_x",
        "global_step_",
        "global_step_7",
    }


def test_manifest_names_its_algorithm_and_old_sha256_manifests_verify(root):
    import hashlib

    ckpt = root / "global_step_2"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["algorithm"] == "blake3"
    import blake3

    data = (ckpt / "actor" / "optim.pt").read_bytes()
    assert manifest["files"]["actor/optim.pt"]["blake3"] == blake3.blake3(data).hexdigest()
    # An earlier build's manifest: sha256 digests and no "algorithm" key.
    old = {
        "global_step": 2,
        "files": {
            rel: {"size": (ckpt / rel).stat().st_size, "sha256": hashlib.sha256((ckpt / rel).read_bytes()).hexdigest()}
            for rel in manifest["files"]
        },
    }
    (ckpt / "manifest.json").write_text(json.dumps(old))
    assert ck.verify(ckpt) is None
    _flip(ckpt / "actor" / "optim.pt")
    assert ck.verify(ckpt) == "actor/optim.pt checksum mismatch"


def test_digests_reported_by_writers_are_trusted_not_recomputed(tmp_path, monkeypatch):
    """What the writing ranks described is not read again; files they did not describe are."""

    def fill(tmp):
        _fill(b"w" * 1000)(tmp)
        return ck.describe([tmp / "actor" / "model.safetensors"], tmp)

    read = []
    real = ck.digest
    monkeypatch.setattr(ck, "digest", lambda p, *a: read.append(Path(p).name) or real(p, *a))
    ck.write(tmp_path / "ckpt", 1, fill)
    assert read == ["model.safetensors", "optim.pt"]  # each once: the writer's, then write()'s own
    assert ck.verify(tmp_path / "ckpt" / "global_step_1") is None


def test_a_writer_report_that_disagrees_with_the_disk_fails_the_write(tmp_path):
    def fill(tmp):
        _fill(b"w" * 1000)(tmp)
        entries = ck.describe([tmp / "actor" / "model.safetensors"], tmp)
        (tmp / "actor" / "model.safetensors").write_bytes(b"short")
        return entries

    with pytest.raises(OSError, match="model.safetensors has 5 bytes, its writer reported 1000"):
        ck.write(tmp_path / "ckpt", 1, fill)
    assert ck.read_latest(tmp_path / "ckpt") is None and not list((tmp_path / "ckpt").iterdir())


def test_a_disk_too_small_for_the_next_checkpoint_is_one_error_before_writing(root, monkeypatch):
    """Each checkpoint here is 6,000 B (two files of 3,000 B) + its manifest; a disk with 6,000 B free
    cannot hold another one +5%: a ValueError naming both sizes, nothing written, `latest` unchanged."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 6000, 6000))
    with pytest.raises(
        ValueError,
        match=r"0\.0 GiB free, but checkpoint global_step_3 needs about 0\.0 GiB "
        r"\(the size of global_step_2.*trainer.max_actor_ckpt_to_keep",
    ):
        ck.write(root, 3, _fill(b"three" * 1000))
    assert ck.read_latest(root) == 2 and not list(root.glob("*global_step_3*"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 6400, 6400))  # 6,000 x 1.05 = 6,300
    ck.write(root, 3, _fill(b"three" * 1000))
    assert ck.read_latest(root) == 3
