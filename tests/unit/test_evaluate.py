"""The evaluation CLI (tools/idlora_eval.py) on real public-domain photos with dlib, and the report helpers."""
from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from idlora.training import evaluate as ev

ROOT = Path(__file__).resolve().parents[2]
FACES = ROOT / "tests" / "assets" / "faces"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two identities (obama: 3 photos; biden: one photo and a copy) and their 'generated' images."""
    base = tmp_path_factory.mktemp("eval")
    layout = {
        "real/obama": {"obama.jpg": "obama.jpg", "obama2.jpg": "obama2.jpg", "obama3.jpg": "obama3.jpg"},
        "real/biden": {"biden.jpg": "biden.jpg", "biden_copy.jpg": "biden.jpg"},
        # obama: one real generation and one image without a face; biden: his own photo and an obama photo
        "gen/obama": {"g1.jpg": "obama2.jpg", "g2.jpg": "no_face.jpg"},
        "gen/biden": {"g1.jpg": "biden.jpg", "g2.jpg": "obama3.jpg"},
        "gen/stranger": {"g1.jpg": "astronaut.jpg"},  # no real photos of this one: not scored
    }
    for folder, files in layout.items():
        (base / folder).mkdir(parents=True)
        for dst, src in files.items():
            shutil.copyfile(FACES / src, base / folder / dst)
    return base


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "idlora_eval.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def report(folders):
    pytest.importorskip("dlib")
    out = folders / "out" / "report.json"
    run = _cli("--generated", str(folders / "gen"), "--identities", str(folders / "real"), "--out", str(out))
    assert run.returncode == 0, run.stderr
    return json.loads(out.read_text()), out, run.stdout


def test_cli_reports_per_identity_facesim_r_facesim_and_no_face(report):
    rep, _, _ = report
    assert set(rep["identities"]) == {"obama", "biden"}  # stranger has no real photos
    obama, biden = rep["identities"]["obama"], rep["identities"]["biden"]
    # references are the first files by name; the others are R-FaceSim's test set (reference excluded)
    assert obama["reference"] == "obama.jpg" and obama["others"] == ["obama2.jpg", "obama3.jpg"]
    assert biden["reference"] == "biden.jpg" and biden["others"] == ["biden_copy.jpg"]
    # obama: g2 has no face, so it is counted and left out (never scored 0)
    assert obama["no_face"] == 1 and obama["no_face_files"] == ["g2.jpg"] and obama["generated"] == 2
    fs, rfs = obama["metrics"]["FaceSim"], obama["metrics"]["R-FaceSim"]
    assert fs["count"] == 1 and fs["no_face"] == 1 and fs["mean"] > 0.93  # obama2 vs obama, same person
    assert rfs["count"] == 1 and rfs["mean"] > 0.93 and rfs["no_face"] == 1
    # biden: his own photo scores 1 against the reference; the obama photo scores clearly lower
    bfs = biden["metrics"]["FaceSim"]["values"]
    assert bfs[0] == pytest.approx(1.0, abs=1e-6) and bfs[1] < 0.88
    assert biden["metrics"]["FaceL2"]["values"][1] > 0.6  # dlib: different people are above L2 0.6
    assert "stranger" in rep["skipped"] and rep["embedder"].startswith("dlib")
    overall = rep["overall"]
    assert overall["FaceSim"]["count"] == 3 and overall["FaceSim"]["no_face"] == 1
    assert overall["R-FaceSim"]["mean"] == pytest.approx(np.mean(overall["R-FaceSim"]["values"]))


def test_cli_writes_csv_and_prints_a_table(report):
    rep, out, stdout = report
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    by = {(r["identity"], r["metric"]): r for r in rows}
    assert float(by[("obama", "FaceSim")]["mean"]) == pytest.approx(rep["identities"]["obama"]["metrics"]["FaceSim"]
                                                                    ["mean"], abs=1e-6)
    assert by[("obama", "R-FaceSim")]["no_face"] == "1" and ("all", "FaceSim") in by
    assert "R-FaceSim" in stdout and "obama" in stdout and "skipped stranger" in stdout
    assert not list(out.parent.glob(".*.tmp")), "atomic writes leave no temp files"


def test_cli_reference_name_and_clear_errors(folders, tmp_path):
    pytest.importorskip("dlib")
    run = _cli("--generated", str(folders / "gen"), "--identities", str(folders / "real"), "--reference-name", "x",
               "--out", str(tmp_path / "r.json"))
    assert run.returncode == 2 and "has no image named 'x'" in run.stderr and "Traceback" not in run.stderr
    run = _cli("--generated", str(tmp_path / "nope"), "--identities", str(folders / "real"))
    assert run.returncode == 2 and "--generated" in run.stderr and "not a folder" in run.stderr
    run = _cli("--generated", str(folders / "gen"), "--identities", str(folders / "real"), "--embedder",
               "arcface-onnx", "--insightface-dir", str(tmp_path / "if"), "--out", str(tmp_path / "r.json"))
    assert run.returncode == 2 and "w600k_r50.onnx" in run.stderr and str(tmp_path / "if") in run.stderr


def test_reference_name_picks_the_file(folders, tmp_path):
    pytest.importorskip("dlib")
    from idlora.models.face_embed import DlibEmbedder
    real = tmp_path / "real"
    shutil.copytree(folders / "real" / "obama", real / "obama")
    rep = ev.evaluate_folders(folders / "gen", real, DlibEmbedder(), reference_name="obama3")
    entry = rep["identities"]["obama"]
    assert entry["reference"] == "obama3.jpg" and entry["others"] == ["obama.jpg", "obama2.jpg"]


def test_report_helpers(tmp_path):
    metrics = ev.merge_metrics([{"FaceSim": {"name": "FaceSim", "mean": 0.5, "values": [0.5], "count": 1,
                                             "no_face": 2, "detail": {"model": "m"}}},
                                {"FaceSim": {"name": "FaceSim", "mean": None, "values": [], "count": 0,
                                             "no_face": 0, "detail": {"note": "not computed"}}}, None])
    assert list(metrics) == ["FaceSim", "FaceSim (2)"]
    json_path, csv_path = ev.write_metrics_report(tmp_path / "r", "my report", metrics, {"name": "my report"})
    data = json.loads(json_path.read_text())
    assert data["metrics"]["FaceSim (2)"]["mean"] is None and csv_path.name == "my report.csv"
    assert csv_path.read_text().splitlines()[1].startswith("FaceSim,0.5000,1,2,m")
    assert ev.jsonable({"a": float("nan"), 1: np.float32(2.5), "v": np.arange(2)}) == {"a": None, "1": 2.5,
                                                                                          "v": [0, 1]}
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="not a valid report name"):
            ev.sanitize_report_name(bad)
    img = ev.render_table(ev.CSV_HEADER, ev.metric_rows(metrics), title="t")
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.shape[0] > 40
    assert (img < 128).any(), "text was drawn"
    assert "FaceSim 0.5000 (1 scored, 2 without a face)" in ev.summary_text(metrics)
    assert math.isnan(ev.as_float(None))


def test_split_prompts():
    assert ev.split_prompts("a cat", 3) == ["a cat"] * 3
    assert ev.split_prompts("a\nb\n", 2) == ["a", "b"]
    with pytest.raises(ValueError, match="prompt has 3 lines but images has 2"):
        ev.split_prompts("a\nb\nc", 2)
