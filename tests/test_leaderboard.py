"""Leaderboard from MLflow: LEADERBOARD.md numbers equal MLflow's, summary.csv equals the metric histories, PNG plots;
markdown layout (bold best per column, paper column, headline) checked on hand-made records."""
import csv
import math
import re

import pytest

from bench_helpers import ROOT, child_runs, cli, history


@pytest.fixture(scope="module")
def quickstart_runs(tmp_path_factory):
    """The quickstart grid, shrunk (tiny CLIP, 3 rounds, two seeds, three algorithms), logged to a temp sqlite."""
    tmp = tmp_path_factory.mktemp("lb")
    sets = [f"common_args.cache_dir={tmp / 'cache'}", f"common_args.output_dir={tmp / 'out'}",
            f"tracking_args.mlflow_tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "model_args.model=tiny-clip",
            "model_args.pretrained=null", "train_args.comm_round=3", "train_args.epochs=1",
            "device_args.num_threads=1", "benchmark_args.seeds=[0,1]"]
    argv = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--only", "algo=zeroshot,local,promptfl",
            "--only", "split=pathological"]
    for s in sets:
        argv += ["--set", s]
    rc, out, err = cli("run", *argv, "--no-progress")
    assert rc == 0, err
    return tmp, argv, f"sqlite:///{tmp / 'mlflow.db'}", out


def _table(md: str, section: str):
    body = md.split(f"## {section}")[1].split("\n## ")[0]
    rows = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| algorithm")]
    head = next(line for line in body.splitlines() if line.startswith("| algorithm"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    return cols, {r.strip("|").split("|")[0].strip(): [c.strip() for c in r.strip("|").split("|")] for r in rows}


def test_leaderboard_numbers_equal_mlflow(quickstart_runs, monkeypatch):
    from mlflow.tracking import MlflowClient

    tmp, argv, uri, run_out = quickstart_runs
    # the cautions follow the setting run (tiny random-init CLIP on the packaged digits), not the quickstart's mini CLIP
    cautions = [line for line in run_out.splitlines() if line.startswith("CAUTION: ")]
    assert len(cautions) == 2, run_out
    assert cautions[0].startswith("CAUTION: backbone tiny-clip has random weights (model_args.pretrained: null)")
    assert cautions[1].startswith("CAUTION: dataset digits: a small packaged stand-in, not one of the paper's datasets; "
                                  "scikit-learn digits")
    assert "mini" not in run_out.lower()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out_dir = tmp / "board"
    rc, out, err = cli("leaderboard", *argv, "--out", str(out_dir))
    assert rc == 0, err
    md = (out_dir / "LEADERBOARD.md").read_text()
    assert [line[len("> **Caution:** "):] for line in md.splitlines() if line.startswith("> **Caution:**")] == \
        [c[len("CAUTION: "):] for c in cautions]
    assert "optimistic" in md and "mini" not in md.lower()
    cols, rows = _table(md, "digits · pathological")
    assert cols[:4] == ["algorithm", "acc_last5 (mean of last 5 rounds)", "acc_last (final round)",
                        "acc_best (best round, optimistic)"]
    client = MlflowClient(tracking_uri=uri)
    runs = child_runs(uri, "quickstart")[1]
    assert len(runs) == 6
    best_col = {}
    for algo in ("zeroshot", "local", "promptfl"):
        mine = [r for r in runs if r.data.tags["algorithm"] == algo]
        assert sorted(r.data.tags["seed"] for r in mine) == ["0", "1"]
        for ci, key in ((1, "acc_last5"), (2, "acc_last"), (3, "acc_best")):
            vals = [r.data.metrics[key] for r in mine]
            mean = (vals[0] + vals[1]) / 2
            std = math.sqrt(((vals[0] - mean) ** 2 + (vals[1] - mean) ** 2) / 2)
            assert rows[algo][ci].strip("*") == f"{100 * mean:.2f} ± {100 * std:.2f}", (algo, key)
            best_col.setdefault(ci, []).append((mean, algo))
        assert rows[algo][cols.index("seeds")] == "0,1"
    for ci, entries in best_col.items():
        top = max(m for m, _ in entries)
        for m, algo in entries:
            assert rows[algo][ci].startswith("**") == (m == top)

    # summary.csv (long form) equals MLflow's per-round histories and summaries
    table = list(csv.DictReader(open(out_dir / "summary.csv")))
    assert len(table) == 6 * 3
    for run in runs:
        mine = [r for r in table if r["run_id"] == run.info.run_id]
        assert [int(r["round"]) for r in mine] == [0, 1, 2]
        for key in ("acc_mean", "acc_weighted", "acc_bottom10", "test_loss"):
            assert [(int(r["round"]), float(r[key])) for r in mine] == history(client, run.info.run_id, key)
        for key in ("acc_last5", "acc_best"):
            assert {float(r[key]) for r in mine} == {run.data.metrics[key]}
        assert {r["partition_hash"] for r in mine} == {run.data.tags["partition_hash"]}
    for name in ("acc_vs_round-digits_pathological.png", "client_acc-digits_pathological.png"):
        data = (out_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # the run command wrote the same files to <output_dir>/<benchmark>
    assert (tmp / "out" / "quickstart" / "LEADERBOARD.md").exists()
    run_csv = list(csv.DictReader(open(tmp / "out" / "quickstart" / "summary.csv")))
    assert [r["acc_mean"] for r in run_csv] == [r["acc_mean"] for r in table]


def test_leaderboard_lists_missing_cells_and_fails_without_runs(quickstart_runs, tmp_path, monkeypatch):
    tmp, argv, uri, _ = quickstart_runs
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    more = [a.replace("seeds=[0,1]", "seeds=[0,1,2]") for a in argv]
    rc, out, _ = cli("leaderboard", *more, "--out", str(tmp_path / "b"), "--headline", "acc_last")
    assert rc == 0 and "3 cell(s) have no finished run" in out
    md = (tmp_path / "b" / "LEADERBOARD.md").read_text()
    assert "Headline: **acc_last**" in md and "- digits/pathological/promptfl/seed2" in md
    empty = [a.replace(str(tmp / "mlflow.db"), str(tmp_path / "empty.db")) for a in argv]
    rc, _, err = cli("leaderboard", *empty, "--out", str(tmp_path / "c"))
    assert rc == 2 and "no finished runs" in err


# the paper's Table 1 setting, written out by hand (RN50 OpenAI weights, 10 clients, all participate, 10 rounds,
# 5 epochs, batch 32, 16 shots, 16 context tokens)
TABLE1 = {"model_args.model": "RN50-quickgelu", "model_args.pretrained": "openai", "model_args.n_ctx": 16,
          "train_args.client_num_in_total": 10, "train_args.client_num_per_round": 10, "train_args.comm_round": 10,
          "train_args.epochs": 5, "train_args.batch_size": 32, "data_args.shots": 16,
          "data_args.dataset": "oxford_pets"}
MINI = {**TABLE1, "model_args.model": "mini-clip", "model_args.pretrained": "package:mini-clip.safetensors",
        "train_args.client_num_in_total": 2, "train_args.client_num_per_round": 2, "train_args.comm_round": 2}


def _rec(algo, seed, last5, last, best, bottom, dataset="oxford_pets", split="pathological", setting=None):
    from benchmark_suite.grid import CellRecord

    return CellRecord(dataset, split, "", algo, seed, 0, f"{algo}{seed}",
                      rounds=[{"round": 0, "acc_mean": last, "acc_bottom10": bottom}],
                      summary={"acc_last5": last5, "acc_last": last, "acc_best": best}, client_acc=[last],
                      setting=dict(TABLE1 if setting is None else setting))


def test_markdown_bold_paper_column_and_headline():
    from benchmark_suite.leaderboard import markdown

    recs = [_rec("pfedmoap", 0, 0.50, 0.60, 0.70, 0.1), _rec("pfedmoap", 1, 0.70, 0.60, 0.90, 0.3),
            _rec("promptfl", 0, 0.65, 0.62, 0.66, 0.5), _rec("fedpgp", 0, 0.10, 0.10, 0.95, 0.0)]
    md = markdown(recs, "acc_last5", "t", None, "test")
    cols, rows = _table(md, "oxford_pets · pathological")
    assert cols[-1] == "paper (Table 1)"
    assert rows["pfedmoap"][1:7] == ["60.00 ± 10.00", "60.00 ± 0.00", "80.00 ± 10.00", "20.00 ± 10.00", "–", "0,1"]
    # one seed: the mean and n=1, no "± 0.00"
    assert rows["promptfl"][1] == "**65.00 (n=1)**" and rows["promptfl"][2] == "**62.00 (n=1)**"
    assert rows["fedpgp"][3] == "**95.00 (n=1)**" and rows["promptfl"][4] == "**50.00 (n=1)**"
    assert rows["promptfl"][6] == "0" and "No paper column" not in md
    assert rows["pfedmoap"][-1] == "**99.06 ± 0.09**" and rows["promptfl"][-1] == "90.79 ± 0.61"
    assert rows["fedpgp"][-1] == "–"  # not in the paper
    md2 = markdown(recs, "acc_last", "t", None, "test")
    cols2, _ = _table(md2, "oxford_pets · pathological")
    assert cols2[1] == "acc_last (final round)" and cols2[2] == "acc_last5 (mean of last 5 rounds)"
    # no paper number for a setting the paper did not run
    md3 = markdown([_rec("pfedmoap", 0, 0.5, 0.5, 0.5, 0.5, split="dirichlet-0.5")], "acc_last5", "t", None, "x")
    assert "| paper (" not in md3
    with pytest.raises(ValueError, match="--headline"):
        markdown(recs, "acc_best", "t", None, "test")
    assert re.search(r"\| pfedmoap \|", md)


def test_markdown_reports_bytes_per_participant_round():
    from benchmark_suite.leaderboard import markdown

    rec = _rec("pfedmoap", 0, 0.5, 0.5, 0.5, 0.1)
    rec.rounds = [{"round": 0, "acc_mean": 0.5, "bytes_up": 2048, "bytes_down": 2048},
                  {"round": 1, "acc_mean": 0.5, "bytes_up": 2048, "bytes_down": 8192}]
    _, rows = _table(markdown([rec], "acc_last5", "t", None, "test"), "oxford_pets · pathological")
    assert rows["pfedmoap"][5] == "2.0 / 5.0"  # mean over rounds: up (2+2)/2 KB, down (2+8)/2 KB


def test_paper_column_only_for_the_papers_setting():
    from benchmark_suite.leaderboard import markdown

    md = markdown([_rec("pfedmoap", 0, 0.5, 0.5, 0.5, 0.5, setting=MINI),
                   _rec("promptfl", 0, 0.4, 0.4, 0.4, 0.4, setting=MINI)], "acc_last5", "t", None, "x")
    cols, rows = _table(md, "oxford_pets · pathological")
    assert cols[-1] == "seeds" and "99.06" not in md and "| paper (" not in md
    note = next(line for line in md.splitlines() if line.startswith("No paper column"))
    assert "Table 1" in note and "model_args.model: mini-clip (paper: RN50-quickgelu or RN50)" in note
    assert "train_args.comm_round: 2 (paper: 10)" in note and "train_args.client_num_in_total: 2 (paper: 10)" in note
    assert "data_args.shots" not in note  # the shots match
    # one mismatching record is enough to drop the column; a local copy of the OpenAI weights still matches
    local = {**TABLE1, "model_args.pretrained": "/models/clip/RN50.pt"}
    mixed = markdown([_rec("pfedmoap", 0, 0.5, 0.5, 0.5, 0.5, setting=local),
                      _rec("promptfl", 0, 0.4, 0.4, 0.4, 0.4, setting={**TABLE1, "train_args.epochs": 1})],
                     "acc_last5", "t", None, "x")
    assert "| paper (" not in mixed and "train_args.epochs: 1 (paper: 5)" in mixed
    same = markdown([_rec("pfedmoap", 0, 0.5, 0.5, 0.5, 0.5, setting=local)], "acc_last5", "t", None, "x")
    assert _table(same, "oxford_pets · pathological")[1]["pfedmoap"][-1] == "**99.06 ± 0.09**"


def test_cautions_follow_the_setting_run():
    from benchmark_suite.leaderboard import console_table, setting_cautions

    quick = {"data_args.dataset": "digits", "model_args.model": "mini-clip",
             "model_args.pretrained": "package:mini-clip.safetensors"}
    got = setting_cautions([_rec("pfedmoap", 0, .5, .5, .5, .5, dataset="digits", setting=quick)] * 2)
    assert len(got) == 2 and got[0].startswith("backbone mini-clip: the packaged mini CLIP")
    assert got[1].startswith("dataset digits: a small packaged stand-in, not one of the paper's datasets; scikit-learn")
    # the quickstart with model and dataset overridden: no caution left
    real = {"data_args.dataset": "caltech101", "model_args.model": "ViT-B-16", "model_args.pretrained": "openai"}
    assert setting_cautions([_rec("pfedmoap", 0, .5, .5, .5, .5, dataset="caltech101", setting=real)]) == []
    rand = {**real, "model_args.pretrained": None}
    assert setting_cautions([_rec("local", 0, .5, .5, .5, .5, setting=rand)], "mine") == [
        "mine", "backbone ViT-B-16 has random weights (model_args.pretrained: null): the numbers check the machinery, "
                "they are not CLIP results"]
    table = console_table([_rec("local", 0, .5, .4, .6, .1, setting=real)], None)
    assert "CAUTION" not in table and "40.00 (n=1)" in table and "±" not in table.split("\n")[2]


@pytest.mark.parametrize("table", [1, 2, 3, 4])
def test_shipped_paper_configs_are_the_papers_setting(table):
    """Every cell of configs/benchmarks/paper_table<k>.yaml gets the paper column (and the mini quickstart none)."""
    from benchmark_suite.grid import cell_setting, expand_grid
    from benchmark_suite.leaderboard import load_paper, paper_entry, setting_mismatch
    from fedml_pfedmoap.config import load_config

    paper = load_paper()
    for cfg_name, want_match in ((f"benchmarks/paper_table{table}.yaml", True), ("quickstart.yaml", False)):
        cells = expand_grid(load_config(ROOT / "configs" / cfg_name))
        recs = [_rec(c.algorithm, c.seed, .5, .5, .5, .5, dataset=c.dataset, split=c.split,
                     setting=cell_setting(c.cfg)) for c in cells]
        for c in cells:
            entry = paper_entry(paper, c.dataset, c.split) or paper_entry(paper, "oxford_pets", "pathological")
            assert (setting_mismatch(paper, entry, [r for r in recs if r.dataset == c.dataset]) == []) == want_match
