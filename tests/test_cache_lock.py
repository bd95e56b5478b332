"""One writer per cache key across processes (``fileio.build_once``): two real processes ask the feature cache for
the same key at the same moment; exactly one encodes, the other waits and reads its file, both get the same tensors,
and the cache file is never seen half-written."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, sys, time
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from fedml_pfedmoap.federated.features import FeatureCache

work, name = Path(sys.argv[1]), sys.argv[2]

class Backbone:  # the two things the cache needs from a backbone: an identity and a (slow, logged) image tower
    identity = "stub-tower-v1"
    embed_dim = 3
    def encode_image(self, imgs, patches=False):
        with open(work / "encoded.log", "a") as f:
            f.write(name + "\n")
        time.sleep(1.5)  # long enough for the other process to ask for the same key meanwhile
        return imgs * 2.0, None

class Split:
    labels = np.arange(7, dtype=np.int64) % 3
    def __len__(self):
        return 7
    def image(self, i):
        return torch.tensor([i, i + 0.5, -i], dtype=torch.float32)

(work / f"ready-{name}").touch()
while len(list(work.glob("ready-*"))) < 2:  # start together: both look up the key before either has written it
    time.sleep(0.01)
cache = FeatureCache(work / "features")
fs = cache.load_or_encode(Backbone(), "fp", "train", Split(), lambda x: x, "identity")
np.save(work / f"feats-{name}.npy", fs.feats.numpy())
np.save(work / f"labels-{name}.npy", fs.labels.numpy())
(work / f"counts-{name}.json").write_text(json.dumps({"hits": cache.hits, "misses": cache.misses}))
"""


def test_two_processes_one_key_one_encoder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), name], env=env, stderr=subprocess.PIPE,
                              text=True) for name in ("a", "b")]
    seen_complete = 0
    deadline = time.monotonic() + 240
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        for f in (tmp_path / "features").glob("*.npz"):  # the final name only ever holds a whole file
            try:
                with np.load(f) as z:
                    assert z["feats"].shape == (7, 3) and z["labels"].shape == (7,)
                seen_complete += 1
            except FileNotFoundError:
                pass
        time.sleep(0.02)
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert (tmp_path / "encoded.log").read_text().split() in (["a"], ["b"])  # exactly one process encoded
    counts = sorted((json.loads((tmp_path / f"counts-{n}.json").read_text()) for n in "ab"), key=lambda c: c["hits"])
    assert counts == [{"hits": 0, "misses": 1}, {"hits": 1, "misses": 0}]  # the other read the file
    i = np.arange(7, dtype=np.float32)
    want = 2.0 * np.stack([i, i + 0.5, -i], axis=1)  # the stub tower doubles each image
    for n in "ab":
        np.testing.assert_array_equal(np.load(tmp_path / f"feats-{n}.npy"), want)
        np.testing.assert_array_equal(np.load(tmp_path / f"labels-{n}.npy"), np.arange(7) % 3)
    files = sorted(p.name for p in (tmp_path / "features").iterdir())
    assert len(files) == 2 and files[0].endswith(".npz") and files[1] == files[0] + ".lock"  # no temp file left


def test_build_once_reuses_and_rebuilds_an_unreadable_file(tmp_path):
    """In one process: an existing readable file is loaded without the lock; an unreadable one is rebuilt."""
    from fedml_pfedmoap.fileio import atomic_write_text, build_once

    path, built = tmp_path / "k.txt", []

    def build():
        built.append(1)
        atomic_write_text(path, "v1")
        return "v1"

    def load():
        text = path.read_text()
        return text if text.startswith("v") else None

    assert build_once(path, load, build) == "v1" and built == [1]
    assert build_once(path, load, build) == "v1" and built == [1]
    path.write_text("garbage")
    assert build_once(path, load, build) == "v1" and built == [1, 1]
    with pytest.raises(RuntimeError):
        build_once(tmp_path / "x", lambda: None, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert not (tmp_path / "x").exists()
