"""Review core: cohorts, the output convention, the crash-safe store, edited versions, export."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import real_path

CT = "ct/totalseg_nifti/example_ct_sm.nii.gz"
SEG = "ct/totalseg_nifti/example_ct_sm_seg_total.nii.gz"
SHA = "ab" * 32


def make_cohort(root: Path, n: int = 5) -> Path:
    """``n`` cases (links to the corpus CT) with outputs by convention and by CSV column."""
    from napari_medfm.io.writers import write_labels
    from napari_medfm.tasks.validate import load_label_map

    ct, seg = real_path(CT), load_label_map(real_path(SEG))
    root.mkdir(parents=True, exist_ok=True)
    (root / "outputs").mkdir()
    for i in range(n):
        os.symlink(ct, root / f"case{i}.nii.gz")
    names = seg.metadata["label_names"]
    arr = np.asarray(seg.data)
    out0 = write_labels(root / "case0.seg.nii.gz", arr, seg.geometry, label_names=names)
    (root / "case0.seg.json").write_text(json.dumps({
        "format": "napari-medfm-segmentation/1", "model": "totalsegmentator",
        "weights_sha256": SHA, "labels": {str(k): v for k, v in names.items()}}))
    write_labels(root / "outputs" / "c3_pred.nii.gz", np.where(arr == 5, 1, 0).astype(np.uint8),
                 seg.geometry, label_names={1: "liver"})
    (root / "case1.findings.json").write_text(json.dumps(
        [{"finding": "pleural effusion", "probability": 0.81},
         {"finding": "nodule", "probability": 0.12}]))
    (root / "case2.report.txt").write_text("Findings: no focal liver lesion.\n")
    with open(root / "cohort.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "labels", "report"])
        for i in range(n):
            w.writerow([f"case{i}", f"case{i}.nii.gz", "outputs/c3_pred.nii.gz" if i == 3 else "",
                        "No acute findings." if i == 4 else ""])
    assert out0.is_file()
    return root / "cohort.csv"


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def test_cohort_from_csv_and_folder_and_output_convention(tmp_path):
    from napari_medfm.tasks.review import find_outputs, load_cohort

    csv_path = make_cohort(tmp_path / "c")
    cases = load_cohort(csv_path)
    assert [c.case_id for c in cases] == [f"case{i}" for i in range(5)]
    assert cases[3].labels == tmp_path / "c" / "outputs" / "c3_pred.nii.gz"
    assert cases[4].report == "No acute findings."
    outs = [find_outputs(c) for c in cases]
    assert outs[0]["segmentation"].name == "case0.seg.nii.gz"
    assert outs[1]["findings"].name == "case1.findings.json"
    assert outs[2]["report"].name == "case2.report.txt"
    assert outs[3]["segmentation"].name == "c3_pred.nii.gz"
    assert outs[4] == {"segmentation": None, "findings": None, "report": "No acute findings."}
    folder = load_cohort(tmp_path / "c")  # outputs, sidecars and the CSV are not cases
    assert [c.case_id for c in folder] == [f"case{i}" for i in range(5)]
    from napari_medfm.errors import MedfmError

    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.png,x\n")
    with pytest.raises(MedfmError, match="'image' column"):
        load_cohort(bad)


def test_store_verdicts_edits_versions_and_export(tmp_path):
    from napari_medfm.progress import drain
    from napari_medfm.tasks.review import ReviewStore, load_case, save_edited_segmentation

    csv_path = make_cohort(tmp_path / "c")
    original = tmp_path / "c" / "case0.seg.nii.gz"
    before = _sha(original)
    store = ReviewStore(tmp_path / "r.db", csv_path)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.set_reviewer("Dr A")
    store.set_verdict("case0", "segmentation", "reject", "misses the liver dome")
    store.set_verdict("case0", "segmentation", "edit", "fixed")
    store.set_verdict("case1", "findings", "accept")
    assert store.verdicts()[("case0", "segmentation")]["verdict"] == "edit"
    assert len(store.history()) == 3  # append-only
    loaded = drain(load_case(store.cases[0], work_dir=store.work_dir))
    assert loaded.provenance == {"model": "totalsegmentator", "weights_sha256": SHA,
                                 "format": "napari-medfm-segmentation/1"}
    lab = np.array(loaded.segmentation.data)
    lab[12, 40:50, 40:50] = 5
    names = loaded.segmentation.metadata["label_names"]
    (tmp_path / "c" / "case0.seg.edit-2.nii.gz").write_bytes(b"debris of a killed save")
    r1 = save_edited_segmentation(store, "case0", lab, loaded.image.geometry, label_names=names,
                                  original=original)
    r2 = save_edited_segmentation(store, "case0", lab, loaded.image.geometry, label_names=names,
                                  original=original)
    assert (r1["version"], r2["version"]) == (1, 3)  # the unrecorded file is never reused
    assert _sha(original) == before  # the model's output is never written over
    p1 = Path(r1["path"])
    assert p1.name == "case0.seg.edit-1.nii.gz" and p1.parent == original.parent
    prov = json.loads(p1.with_name("case0.seg.edit-1.json").read_text())
    assert prov["model"] == "totalsegmentator" and prov["weights_sha256"] == SHA
    assert prov["reviewer"] == "Dr A" and prov["edited_from"] == str(original) and prov["time"]
    side = json.loads(p1.with_name("case0.seg.edit-1.labels.json").read_text())
    assert {e["value"]: e.get("name") for e in side["labels"]}[5] == "liver"
    # an edit of a case without a model output on disk goes to the store's work folder
    r4 = save_edited_segmentation(store, "case4", lab, loaded.image.geometry)
    assert Path(r4["path"]).parent == store.work_dir
    # reloading the case brings the latest edit back
    again = drain(load_case(store.cases[0], work_dir=store.work_dir,
                            latest_edit=store.latest_edit("case0")["path"]))
    assert int(np.asarray(again.edit.data)[12, 45, 45]) == 5
    assert int(np.asarray(again.segmentation.data)[12, 45, 45]) != 5 or lab[12, 45, 45] == 5
    out = store.export_csv(tmp_path / "review.csv")
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    by = {(r["case"], r["output"]): r for r in rows}
    assert by[("case0", "segmentation")]["verdict"] == "edit"
    assert by[("case0", "segmentation")]["edit_version"] == "3"
    assert by[("case0", "segmentation")]["weights_sha256"] == SHA
    assert by[("case1", "findings")]["verdict"] == "accept"
    store.close()
    from napari_medfm.cli import main

    assert main(["review", "export", str(tmp_path / "r.db"), "--out", str(tmp_path / "x.csv")]) == 0
    with open(tmp_path / "x.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == rows
    assert main(["review", "status", str(tmp_path / "r.db")]) == 0
    assert main(["review", "status", str(tmp_path / "none.db")]) == 2  # clear error, no store


def test_store_keeps_every_committed_action_after_sigkill(tmp_path):
    from napari_medfm.tasks.review import ReviewStore

    csv_path = make_cohort(tmp_path / "c")
    db = tmp_path / "r.db"
    ReviewStore(db, csv_path).close()
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from napari_medfm.tasks.review import ReviewStore
        s = ReviewStore({str(db)!r})
        s.set_reviewer("Dr K")
        for i in range(10_000):
            s.set_position(i % 5)
            s.set_verdict(f"case{{i % 5}}", "segmentation", "accept", f"n{{i}}")
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    last = -1
    t0 = time.monotonic()
    while last < 30 and time.monotonic() - t0 < 60:
        line = proc.stdout.readline()
        if not line:
            break
        last = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last >= 30, "the writer did not get going"
    store = ReviewStore(db)
    notes = {int(h["note"][1:]) for h in store.history()}
    assert set(range(last + 1)) <= notes  # everything reported as done is there
    assert store.reviewer == "Dr K"
    n = max(notes)
    assert store.position in (n % 5, (n + 1) % 5)  # position is written before the verdict
    store.close()


def test_outputs_on_demand_with_hu_basic(tmp_path):
    from napari_medfm.progress import drain
    from napari_medfm.tasks.review import ReviewStore, find_outputs, load_case

    csv_path = make_cohort(tmp_path / "c")
    store = ReviewStore(tmp_path / "r.db", csv_path)
    case = store.cases[4]
    loaded = drain(load_case(case, work_dir=store.work_dir))
    assert loaded.segmentation is None
    from napari_medfm.tasks.review import compute_outputs

    written = drain(compute_outputs(case, loaded.image, store.work_dir, segment_model="hu-basic"))
    assert written["segmentation"].name == "case4.seg.nii.gz"
    assert find_outputs(case, store.work_dir)["segmentation"] == written["segmentation"]
    again = drain(load_case(case, work_dir=store.work_dir))
    assert again.provenance["model"] == "hu-basic"
    assert "lungs" in again.segmentation.metadata["label_names"].values()
    store.close()
