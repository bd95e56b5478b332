"""After parsing, bad input and Ctrl-C end in one line on stderr (no traceback) with exit status 2 or 130."""
import io

import numpy as np
import pytest
from PIL import Image

from bench_helpers import cli, write_grid
from fedml_pfedmoap.data.base import DatasetError, FileSplit


def one_error_line(err: str, start: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(start), lines[0]
    return lines[0]


def test_missing_data_root_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("PFEDMOAP_DATA_ROOT", raising=False)
    path = write_grid(tmp_path, tmp_path / "cache")
    rc, _, err = cli("run", "--config", str(path), "--set", "data_args.dataset=caltech101")
    assert rc == 2
    assert "no data root given" in one_error_line(err, "pfedmoap-bench run: error: dataset 'caltech101'")


def test_impossible_partition_is_one_line(tmp_path):
    path = write_grid(tmp_path, tmp_path / "cache", train_args={"client_num_in_total": 11, "client_num_per_round": 11})
    rc, _, err = cli("run", "--config", str(path))
    assert rc == 2
    assert "10 classes cannot be shared by 11 clients" in one_error_line(err, "pfedmoap-bench run: error: ")


def test_text_file_as_pretrained_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "clip.pt"
    bad.write_text("not weights\n")
    path = write_grid(tmp_path, tmp_path / "cache", model_args={"pretrained": str(bad)})
    rc, _, err = cli("run", "--config", str(path))
    assert rc == 2
    line = one_error_line(err, "pfedmoap-bench run: error: model_args.pretrained: ")
    assert str(bad) in line and "expected an open_clip state dict" in line


def test_unknown_model_is_one_line(tmp_path):
    path = write_grid(tmp_path, tmp_path / "cache", model_args={"model": "ViT-B-61"})
    rc, _, err = cli("run", "--config", str(path))
    assert rc == 2
    assert "closest accepted names: ViT-B-16" in one_error_line(err, "pfedmoap-bench run: error: model_args.model")


@pytest.fixture
def interrupting_runner(monkeypatch):
    """``pfedmoap-bench run`` whose main raises the given exception (Ctrl-C arriving mid-run)."""
    import benchmark_suite.runner as runner

    def install(exc):
        def main(args):
            raise exc

        monkeypatch.setattr(runner, "main", main)

    return install


def test_ctrl_c_is_one_line_and_status_130(tmp_path, interrupting_runner):
    interrupting_runner(KeyboardInterrupt())
    rc, _, err = cli("run", "--config", str(write_grid(tmp_path, tmp_path / "cache")))
    assert rc == 130
    assert one_error_line(err, "pfedmoap-bench run: ") == \
        "pfedmoap-bench run: interrupted; run the same command again to resume"


def test_runners_interrupted_message_is_printed(tmp_path, interrupting_runner, monkeypatch):
    import benchmark_suite.runner as runner

    class Interrupted(KeyboardInterrupt):  # stands in for the runner's own class, whatever it derives from
        pass

    monkeypatch.setattr(runner, "Interrupted", Interrupted, raising=False)
    interrupting_runner(Interrupted("interrupted after 3 of 8 cells; run the same command again to resume cell 4"))
    rc, _, err = cli("run", "--config", str(write_grid(tmp_path, tmp_path / "cache")))
    assert rc == 130
    assert one_error_line(err, "pfedmoap-bench run: ").endswith("resume cell 4")


def test_a_bug_keeps_its_traceback(tmp_path, interrupting_runner):
    interrupting_runner(ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        cli("run", "--config", str(write_grid(tmp_path, tmp_path / "cache")))


def test_truncated_jpeg_names_the_file(tmp_path):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (tmp_path / "ok.jpg").write_bytes(buf.getvalue())
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    split = FileSplit(tmp_path, ["ok.jpg", "cut.jpg"], [0, 1])
    assert split.image(0).size == (64, 64)
    with pytest.raises(DatasetError, match=rf"image {tmp_path / 'cut.jpg'}: cannot be decoded \(.*truncated"):
        split.image(1)
