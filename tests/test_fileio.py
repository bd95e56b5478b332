"""The one atomic-write helper and the file digest (fedml_pfedmoap/fileio.py)."""
import hashlib
import json

import numpy as np
import pytest

from fedml_pfedmoap.fileio import atomic_path, atomic_write_json, atomic_write_npz, atomic_write_text, file_hexdigest


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_replace_keep_previous_fsync_and_missing_folder(tmp_path):
    target, prev = tmp_path / "deep" / "state.pt", tmp_path / "deep" / "state.prev.pt"
    with atomic_path(target, fsync=True, keep_previous=prev) as tmp:
        assert tmp.parent == target.parent and tmp.exists()
        tmp.write_bytes(b"first")
    assert target.read_bytes() == b"first" and not prev.exists()  # nothing to keep the first time
    with atomic_path(target, fsync=True, keep_previous=prev) as tmp:
        tmp.write_bytes(b"second")
    assert (target.read_bytes(), prev.read_bytes()) == (b"second", b"first")
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.prev.pt", "state.pt"]


def test_writers_match_the_plain_library_calls(tmp_path):
    blob = {"b": [1, 2], "a": "é", "n": None}
    atomic_write_json(tmp_path / "x.json", blob, indent=1, sort_keys=True)
    assert (tmp_path / "x.json").read_text() == json.dumps(blob, indent=1, sort_keys=True)
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_bytes() == "héllo\n".encode("utf-8")
    arrays = {"feats": np.arange(6, dtype=np.float32).reshape(2, 3), "labels": np.array([3, 1])}
    atomic_write_npz(tmp_path / "f.npz", **arrays)
    with np.load(tmp_path / "f.npz") as z:
        assert sorted(z.files) == ["feats", "labels"] and all(np.array_equal(z[k], v) for k, v in arrays.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npz", "t.txt", "x.json"]


def test_file_hexdigest_reads_in_blocks(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (3 << 20) + 17, dtype=np.uint8).tobytes()  # > 1 MiB blocks
    (tmp_path / "w.bin").write_bytes(data)
    assert file_hexdigest(tmp_path / "w.bin") == hashlib.sha256(data).hexdigest()
    assert file_hexdigest(tmp_path / "w.bin", "md5") == hashlib.md5(data).hexdigest()
