"""Parquet feature cache: schema round trip, incremental / interrupted / corrupted ingest,
quarantine through the real loader, and the torch and Ray readers.

Volumes are tiny real NIfTI files (30x34x26 at 2 mm, asymmetric) preprocessed to (12, 14, 10)
at 4 mm, so every ingest runs the real nibabel + preprocessing code in well under a second.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rankcore.cache import (
    CACHE_SCHEMA,
    METADATA_COLUMNS,
    VolumeDataset,
    cache_lock,
    decode_volume,
    find_layout,
    ingest_cohort,
    open_cache,
    plan_ingest,
)
from rankcore.cache.layout import CacheLayout, read_manifest
from rankcore.cache.schema import SourceStat, encode_volume, rows_to_table, volume_row
from rankcore.cache.shard_writer import write_shard
from rankcore.errors import InputError
from rankcore.mri import preprocess_file, read_cohort
from rankcore.mri.types import (
    QUARANTINE_CATEGORIES,
    Cohort,
    CohortRow,
    PreprocessConfig,
    PreprocessedVolume,
)

CFG = PreprocessConfig(spacing=4.0, shape=(12, 14, 10), max_voxels=50_000,
                       tissue=False)  # box phantoms: tissue is tested in test_mri_tissue.py
SRC_SHAPE = (30, 34, 26)


# ----------------------------------------------------------------------------- fixtures


def head(seed: int, shape=SRC_SHAPE) -> np.ndarray:
    """An asymmetric bright blob on a dark background, different for every seed."""
    rng = np.random.default_rng(seed)
    x = np.zeros(shape, np.float32)
    x[5:25, 6:29, 4:21] = 100.0
    x[8:14, 10:16, 8:12] = 160.0 + 10 * rng.random()  # an off-centre "ventricle"
    return x + rng.normal(0.0, 3.0, shape).astype(np.float32)


def write_nifti(path: Path, data: np.ndarray, *, affine=None, codes=True) -> Path:
    if affine is None:
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        affine[:3, 3] = [-30.0, -34.0, -26.0]
    img = nib.Nifti1Image(data, affine)
    if not codes:  # no sform, no qform: the header gives no orientation
        img.set_sform(None, code=0)
        img.set_qform(None, code=0)
    nib.save(img, path)
    return path


def make_cohort(root: Path, n: int, *, first: int = 0) -> Cohort:
    """n good subjects written as .nii.gz under ``root`` (existing files are kept)."""
    rows = []
    for i in range(first, first + n):
        p = root / f"sub-{i:02d}_T1w.nii.gz"
        if not p.exists():
            write_nifti(p, head(i))
        rows.append(CohortRow(f"sub-{i:02d}", p, age=20.0 + i, sex="F" if i % 2 else "M",
                              site=f"site{i % 3}", split="train" if i % 4 else "test"))
    return Cohort(root, "manifest", tuple(rows))


def with_rows(cohort: Cohort, rows) -> Cohort:
    return dataclasses.replace(cohort, rows=tuple(rows))


class Counting:
    """preprocess_file that counts its calls (in-process engine only)."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[str] = []
        self.fail_on = fail_on

    def __call__(self, path, config):
        self.calls.append(Path(path).name)
        if self.fail_on is not None and self.fail_on in Path(path).name:
            raise RuntimeError("simulated crash inside preprocessing")
        return preprocess_file(path, config)


def files_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest_rows(cache: Path) -> int:
    layout = CacheLayout.for_config(cache, CFG)
    return sum(s.rows for s in read_manifest(layout).shards)


@pytest.fixture()
def cohort(tmp_path) -> Cohort:
    src = tmp_path / "src"
    src.mkdir()
    return make_cohort(src, 6)


# ----------------------------------------------------------------------------- schema


def _pv(seed: int) -> PreprocessedVolume:
    rng = np.random.default_rng(seed)
    affine = np.array([[4.0, 0, 0, -24], [0, 4, 0, -28], [0, 0, 4, -20], [0, 0, 0, 1]])
    return PreprocessedVolume(
        data=rng.normal(0, 1, CFG.shape).astype(np.float32), affine=affine,
        spacing=(4.0, 4.0, 4.0), source_orientation="LAS", source_spacing=(1.0, 1.2, 0.9),
        source_shape=(7, 8, 9), actions=["reoriented LAS->RAS", "resampled"],
        features={"brain_volume_ml": 1234.5, "p01": 1.0, "p50": 50.0, "p99": 99.0})


def test_schema_round_trip_through_a_shard(tmp_path):
    rows = [CohortRow("sub-a", Path("/x/a.nii.gz"), session="ses-1", age=71.5, sex="F",
                      site="s1", split="train"),
            CohortRow("sub-b", Path("/x/b.nii"), age=None, age_censored=False)]
    pvs = [_pv(0), _pv(1)]
    records = [volume_row(r, pv, CFG, SourceStat("ab" * 32, 100 + i, 10**18 + i))
               for i, (r, pv) in enumerate(zip(rows, pvs))]
    info = write_shard(rows_to_table(records), tmp_path, seq=1)
    table = pq.read_table(tmp_path / info.name)
    assert table.schema.remove_metadata().equals(CACHE_SCHEMA.remove_metadata())
    assert info.rows == 2 and info.keys == ["sub-a/ses-1", "sub-b"]
    got = table.to_pylist()
    assert got[0]["age"] == 71.5 and got[1]["age"] is None
    assert got[0]["session"] == "ses-1" and got[1]["session"] is None
    assert got[0]["source_digest"] == "ab" * 32 and got[1]["source_mtime_ns"] == 10**18 + 1
    assert got[0]["preproc_digest"] == CFG.digest()
    assert got[0]["shape"] == [12, 14, 10] and got[0]["source_shape"] == [7, 8, 9]
    assert got[0]["brain_volume_ml"] == 1234.5 and got[0]["actions"].startswith("reoriented")
    for rec, pv in zip(got, pvs):
        np.testing.assert_array_equal(np.array(rec["affine"]).reshape(4, 4), pv.affine)
        vol = decode_volume(rec["volume"], rec["shape"], rec["volume_dtype"])
        assert vol.dtype == np.float16 and vol.shape == CFG.shape
        np.testing.assert_array_equal(vol, pv.data.astype(np.float16))  # C order preserved
    # one row per row group, the volume uncompressed and without statistics
    meta = pq.ParquetFile(tmp_path / info.name).metadata
    assert meta.num_row_groups == 2
    vol_col = CACHE_SCHEMA.get_field_index("volume")
    assert meta.row_group(0).column(vol_col).compression == "UNCOMPRESSED"
    assert not meta.row_group(0).column(vol_col).is_stats_set


def test_volume_row_rejects_wrong_shape():
    pv = _pv(0)
    pv.data = pv.data[:, :, :9]
    with pytest.raises(InputError, match="configured shape"):
        volume_row(CohortRow("a", Path("a.nii")), pv, CFG, SourceStat("0", 1, 1))


def test_float16_encoding_saturates_instead_of_overflowing():
    x = np.array([[[1e6, -1e6, 0.5]]], np.float32)
    vol = decode_volume(encode_volume(x, "float16"), x.shape, "float16")
    assert np.isfinite(vol).all() and vol[0, 0, 0] == np.finfo(np.float16).max


def test_metadata_columns_exclude_only_the_volumes():
    assert set(CACHE_SCHEMA.names) - set(METADATA_COLUMNS) == {"volume", "tissue"}


# ----------------------------------------------------------------------------- incremental


def test_ingest_then_unchanged_rerun_writes_nothing(cohort, tmp_path):
    cache = tmp_path / "cache"
    first = ingest_cohort(cohort, cache, CFG, batch_size=4)
    assert (first.ingested, first.reused, first.total) == (6, 0, 6)
    assert first.failed_fraction == 0.0 and first.cache_path.endswith(CFG.digest())
    before = files_state(cache)
    counting = Counting()
    again = ingest_cohort(cohort, cache, CFG, batch_size=4, preprocess=counting)
    assert (again.ingested, again.reused, again.relabelled) == (0, 6, 0)
    assert counting.calls == []
    assert files_state(cache) == before  # not one byte written, not even an mtime
    with cache_lock(CacheLayout.for_config(cache, CFG)):
        assert plan_ingest(cohort, cache, CFG).batches == []  # nothing even hashed


def test_adding_subjects_processes_only_the_new_ones(cohort, tmp_path):
    cache = tmp_path / "cache"
    ingest_cohort(cohort, cache, CFG)
    bigger = make_cohort(cohort.root, 8)
    counting = Counting()
    s = ingest_cohort(bigger, cache, CFG, preprocess=counting)
    assert (s.ingested, s.reused) == (2, 6)
    assert sorted(counting.calls) == ["sub-06_T1w.nii.gz", "sub-07_T1w.nii.gz"]
    assert open_cache(cache).keys == [f"sub-{i:02d}" for i in range(8)]


def test_changed_source_file_is_reprocessed_and_supersedes_the_old_row(cohort, tmp_path):
    cache = tmp_path / "cache"
    ingest_cohort(cohort, cache, CFG, batch_size=4)
    old = open_cache(cache)
    i_old = old.keys.index("sub-02")
    old_vol = old.read_volume(i_old).copy()
    write_nifti(cohort.rows[2].path, head(99))  # new content, same path
    counting = Counting()
    s = ingest_cohort(cohort, cache, CFG, batch_size=4, preprocess=counting)
    assert (s.ingested, s.reused) == (1, 5) and counting.calls == ["sub-02_T1w.nii.gz"]
    new = open_cache(cache)
    assert new.keys == old.keys and manifest_rows(cache) == 6  # old row compacted away
    i = new.keys.index("sub-02")
    digests = new.table.column("source_digest").to_pylist()
    assert digests[i] != old.table.column("source_digest")[i_old].as_py()
    assert not np.array_equal(new.read_volume(i), old_vol)
    expected = preprocess_file(cohort.rows[2].path, CFG).data
    np.testing.assert_allclose(new.read_volume(i).astype(np.float32), expected,
                               rtol=1e-3, atol=1e-3)


def test_touched_but_identical_file_is_hashed_not_reprocessed(cohort, tmp_path):
    cache = tmp_path / "cache"
    ingest_cohort(cohort, cache, CFG)
    p = cohort.rows[1].path
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    counting = Counting()
    s = ingest_cohort(cohort, cache, CFG, preprocess=counting)
    assert counting.calls == [] and (s.ingested, s.reused, s.relabelled) == (0, 6, 1)
    row = open_cache(cache).table.to_pylist()[1]
    assert row["key"] == "sub-01" and row["source_mtime_ns"] == p.stat().st_mtime_ns
    with cache_lock(CacheLayout.for_config(cache, CFG)):  # the new stat is now remembered
        assert plan_ingest(cohort, cache, CFG).batches == []


def test_changed_age_relabels_without_reprocessing(cohort, tmp_path):
    cache = tmp_path / "cache"
    ingest_cohort(cohort, cache, CFG)
    rows = list(cohort.rows)
    rows[3] = dataclasses.replace(rows[3], age=89.0, age_censored=True, split="val")
    counting = Counting()
    s = ingest_cohort(with_rows(cohort, rows), cache, CFG, preprocess=counting)
    assert counting.calls == [] and s.relabelled == 1
    view = open_cache(cache)
    rec = view.table.to_pylist()[3]
    assert (rec["key"], rec["age"], rec["age_censored"], rec["split"]) == (
        "sub-03", 89.0, True, "val")
    assert view.splits == ["test", "train", "val"]


def test_subjects_removed_from_the_cohort_are_pruned(cohort, tmp_path):
    cache = tmp_path / "cache"
    ingest_cohort(cohort, cache, CFG, batch_size=4)
    s = ingest_cohort(with_rows(cohort, cohort.rows[:3]), cache, CFG, batch_size=4)
    assert s.removed == 3 and open_cache(cache).keys == ["sub-00", "sub-01", "sub-02"]
    assert manifest_rows(cache) == 3
    kept = ingest_cohort(cohort, cache, CFG, prune=False)
    assert kept.ingested == 3 and len(open_cache(cache)) == 6


def test_changed_config_gets_its_own_folder(cohort, tmp_path):
    cache = tmp_path / "cache"
    other = dataclasses.replace(CFG, shape=(10, 12, 8))
    a = ingest_cohort(cohort, cache, CFG)
    b = ingest_cohort(cohort, cache, other)
    assert a.cache_path != b.cache_path and b.ingested == 6
    assert sorted(p.name for p in cache.iterdir()) == sorted([CFG.digest(), other.digest()])
    for cfg in (CFG, other):
        layout = find_layout(cache, cfg)
        assert (layout.folder / "config.json").is_file()
        assert open_cache(cache, cfg).config == cfg
        assert VolumeDataset(cache, cfg)[0]["image"].shape == (1, *cfg.shape)
    with pytest.raises(InputError, match="2 preprocessing configs"):
        open_cache(cache)


# ----------------------------------------------------------------------------- interrupted


def test_interrupted_ingest_leaves_no_accepted_partial_shard_and_rerun_completes(
        cohort, tmp_path):
    cache = tmp_path / "cache"

    def stop_after_first_batch(done, total):
        raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        ingest_cohort(cohort, cache, CFG, batch_size=2, progress=stop_after_first_batch)
    layout = CacheLayout.for_config(cache, CFG)
    (good,) = read_manifest(layout).shards  # the committed batch is kept
    # What a crash in the middle of a write leaves: a half shard and a temporary file.
    half = layout.shard_dir / "part-000002-deadbeef.parquet"
    half.write_bytes((layout.shard_dir / good.name).read_bytes()[:500])
    (layout.shard_dir / ".tmp-part-000003-x.parquet.1234").write_bytes(b"PAR1 partial")
    view = open_cache(cache)
    assert view.keys == ["sub-00", "sub-01"]  # only what the manifest accepted
    counting = Counting()
    s = ingest_cohort(cohort, cache, CFG, batch_size=2, preprocess=counting)
    assert (s.ingested, s.reused) == (4, 2) and len(counting.calls) == 4
    assert open_cache(cache).keys == [f"sub-{i:02d}" for i in range(6)]
    assert sorted(p.name for p in layout.shard_dir.iterdir()) == sorted(
        s.name for s in read_manifest(layout).shards)  # stray files deleted


def test_interrupted_reprocessing_keeps_the_newer_row_until_the_rerun_compacts(
        cohort, tmp_path):
    cache = tmp_path / "cache"
    ingest_cohort(cohort, cache, CFG, batch_size=6)
    write_nifti(cohort.rows[0].path, head(123))

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # new row committed, old shard not yet compacted
        ingest_cohort(cohort, cache, CFG, progress=interrupt)
    layout = CacheLayout.for_config(cache, CFG)
    manifest = read_manifest(layout)
    assert not manifest.complete and manifest_rows(cache) == 7
    view = open_cache(cache)
    assert view.keys == [f"sub-{i:02d}" for i in range(6)]
    fresh = preprocess_file(cohort.rows[0].path, CFG).data
    np.testing.assert_allclose(view.read_volume(0).astype(np.float32), fresh, atol=1e-2)
    s = ingest_cohort(cohort, cache, CFG)
    assert (s.ingested, s.reused) == (0, 6)
    assert read_manifest(layout).complete and manifest_rows(cache) == 6


def test_killed_ingest_loses_only_unrecorded_shards_and_rerun_completes(
        cohort, tmp_path, monkeypatch):
    """A process killed outright runs no exception handler: shards committed after the last
    manifest checkpoint are on disk but not in the manifest. No reader trusts them, and the
    rerun deletes them as strays and processes their subjects again."""
    cache = tmp_path / "cache"
    ingest_cohort(with_rows(cohort, cohort.rows[:2]), cache, CFG)
    layout = CacheLayout.for_config(cache, CFG)
    before = read_manifest(layout).to_dict()

    def killed(done, total):
        raise SystemExit("killed")  # stands for SIGKILL: the flush below is disabled

    monkeypatch.setattr("rankcore.cache.ingest.save_manifest", lambda plan: None)
    with pytest.raises(SystemExit):
        ingest_cohort(cohort, cache, CFG, batch_size=2, progress=killed)
    monkeypatch.undo()
    assert read_manifest(layout).to_dict() == before  # still the last complete manifest
    assert len(list(layout.shard_dir.iterdir())) == len(before["shards"]) + 1  # one stray
    assert open_cache(cache).keys == ["sub-00", "sub-01"]
    counting = Counting()
    s = ingest_cohort(cohort, cache, CFG, batch_size=2, preprocess=counting)
    assert (s.ingested, s.reused) == (4, 2) and len(counting.calls) == 4
    assert open_cache(cache, verify=True).keys == [f"sub-{i:02d}" for i in range(6)]
    assert sorted(p.name for p in layout.shard_dir.iterdir()) == sorted(
        sh.name for sh in read_manifest(layout).shards)


def test_manifest_checkpoints_while_batches_commit(cohort, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    layout = CacheLayout.for_config(cache, CFG)
    seen = []
    monkeypatch.setattr("rankcore.cache.ingest.CHECKPOINT_SECONDS", 0.0)
    ingest_cohort(cohort, cache, CFG, batch_size=2,
                  progress=lambda done, total: seen.append(len(read_manifest(layout).shards)))
    assert seen == [1, 2, 3]  # every committed batch recorded at once (checkpoint due)
    monkeypatch.setattr("rankcore.cache.ingest.CHECKPOINT_SECONDS", 3600.0)
    seen.clear()
    ingest_cohort(cohort, tmp_path / "other", CFG, batch_size=2, progress=lambda done, total:
                  seen.append(CacheLayout.for_config(tmp_path / "other", CFG)
                              .manifest_path.exists()))
    assert seen == [False, False, False]  # written once, at the end
    assert open_cache(tmp_path / "other").keys == [f"sub-{i:02d}" for i in range(6)]


def test_default_batches_hold_up_to_64_subjects_and_feed_every_worker(cohort, tmp_path):
    from rankcore.cache.plan import DEFAULT_BATCH_SIZE, default_batch_size

    assert DEFAULT_BATCH_SIZE == 64
    assert [default_batch_size(n, w) for n, w in [(6, 1), (200, 1), (6, 4), (200, 4)]] == [
        6, 64, 2, 50]
    assert [len(b.subjects) for b in plan_ingest(cohort, tmp_path / "c", CFG).batches] == [6]
    assert [len(b.subjects) for b in plan_ingest(cohort, tmp_path / "d", CFG,
                                                 workers=4).batches] == [2, 2, 2]


def test_format_1_manifest_with_sha256_checksums_is_still_read_and_verified(cohort, tmp_path):
    import hashlib
    import json

    cache = tmp_path / "cache"
    ingest_cohort(cohort, cache, CFG, batch_size=3)
    layout = CacheLayout.for_config(cache, CFG)
    d = json.loads(layout.manifest_path.read_text())
    assert d["format"] == 3 and all(s["checksum"].startswith("crc32:") for s in d["shards"])
    d["format"] = 1  # what brainrank wrote before: a sha256 per shard, no manifest checksum
    del d["checksum"]
    for shard in d["shards"]:
        del shard["checksum"]
        shard["sha256"] = hashlib.sha256(layout.shard_path(shard["name"]).read_bytes()
                                         ).hexdigest()
    layout.manifest_path.write_text(json.dumps(d))
    assert open_cache(cache, verify=True).keys == [f"sub-{i:02d}" for i in range(6)]
    s = ingest_cohort(cohort, cache, CFG, batch_size=3)
    assert (s.ingested, s.reused, s.rebuilt_shards) == (0, 6, 0)
    bad = layout.shard_path(d["shards"][0]["name"])
    _flip_volume_bytes(bad, row_group=0)
    with pytest.raises(InputError, match="corrupt"):
        open_cache(cache, verify=True)
    s = ingest_cohort(cohort, cache, CFG, batch_size=3)
    assert (s.ingested, s.rebuilt_shards) == (3, 1)
    # rewritten in format 3; the intact old shard keeps its sha256, the rebuilt one a CRC
    assert json.loads(layout.manifest_path.read_text())["format"] == 3
    assert sorted(sh.checksum.split(":")[0] for sh in read_manifest(layout).shards) == [
        "crc32", "sha256"]


def test_source_digest_is_the_sha256_of_the_bytes_read_once(cohort, tmp_path):
    import hashlib

    cache = tmp_path / "cache"
    ingest_cohort(cohort, cache, CFG)
    rows = {r["key"]: r for r in open_cache(cache).table.to_pylist()}
    for row in cohort.rows:
        assert rows[row.key]["source_digest"] == hashlib.sha256(row.path.read_bytes()
                                                                ).hexdigest()


def test_second_writer_is_refused_while_an_ingest_holds_the_lock(cohort, tmp_path):
    import os
    import subprocess
    import sys

    # The lock excludes other processes (within one process it is re-entrant).
    cache = tmp_path / "cache"
    folder = CacheLayout.for_config(cache, CFG).folder
    code = ("import sys, time\nfrom rankcore._lock import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=f"in use by another brainrank run .pid {holder.pid}"):
            ingest_cohort(cohort, cache, CFG)
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- corruption


def _flip_volume_bytes(path: Path, row_group: int) -> None:
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(row_group).column(CACHE_SCHEMA.get_field_index("volume"))
    at = col.data_page_offset + col.total_compressed_size // 2
    b = bytearray(path.read_bytes())
    b[at:at + 4] = bytes(x ^ 0xFF for x in b[at:at + 4])
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_shard_is_detected_never_read_and_rebuilt(cohort, tmp_path, damage):
    cache = tmp_path / "cache"
    ingest_cohort(cohort, cache, CFG, batch_size=3)
    ds = VolumeDataset(cache)
    before = [ds[i]["image"] for i in range(6)]
    layout = CacheLayout.for_config(cache, CFG)
    bad = read_manifest(layout).shards[1]
    path = layout.shard_path(bad.name)
    if damage == "flip":
        _flip_volume_bytes(path, row_group=1)
        ds = VolumeDataset(cache)  # metadata pages are intact: opening works ...
        with pytest.raises(InputError, match="corrupt"):
            ds[ds.keys.index(bad.keys[1])]  # ... but the damaged page fails its checksum
        assert ds[0]["image"].shape == (1, *CFG.shape)  # other shards still read
    else:
        path.write_bytes(path.read_bytes()[:-100])
        with pytest.raises(InputError, match="corrupt"):
            open_cache(cache)
    with pytest.raises(InputError, match="corrupt"):
        open_cache(cache, verify=True)
    counting = Counting()
    s = ingest_cohort(cohort, cache, CFG, batch_size=3, preprocess=counting)
    assert s.rebuilt_shards == 1 and s.ingested == 3 and s.reused == 3
    assert sorted(counting.calls) == sorted(f"{k}_T1w.nii.gz" for k in bad.keys)
    after = VolumeDataset(cache, verify=True)
    for i in range(6):
        np.testing.assert_array_equal(after[i]["image"].numpy(), before[i].numpy())


# ----------------------------------------------------------------------------- quarantine


def test_every_quarantine_category_through_the_real_ingest(tmp_path):
    root = tmp_path / "cohort"
    (root / "img").mkdir(parents=True)
    outside = tmp_path / "elsewhere.nii.gz"
    write_nifti(outside, head(50))
    good = {f"sub-g{i}": write_nifti(root / "img" / f"g{i}.nii.gz", head(i)) for i in range(3)}
    bad_data = np.asarray(head(7))
    nonfinite = bad_data.copy()
    nonfinite[3, 4, 5] = np.nan
    files = {
        "sub-unreadable": (root / "img" / "u.nii.gz", None),
        "sub-wrongdims": (root / "img" / "w.nii.gz", np.stack([bad_data, bad_data], -1)),
        "sub-toolarge": (root / "img" / "t.nii.gz", np.ones((40, 40, 40), np.float32)),
        "sub-badaffine": (root / "img" / "a.nii.gz", bad_data),
        "sub-nonfinite": (root / "img" / "n.nii.gz", nonfinite),
        "sub-empty": (root / "img" / "e.nii.gz", np.full(SRC_SHAPE, 7.0, np.float32)),
    }
    for pid, (p, data) in files.items():
        if data is None:
            p.write_bytes(b"\x1f\x8b not really gzip")
        else:
            write_nifti(p, data, codes=pid != "sub-badaffine")
    table = [("sub-g0", "img/g0.nii.gz", "30"), ("sub-g1", "img/g1.nii.gz", "41"),
             ("sub-g2", "img/g2.nii.gz", "89+"), ("sub-g0", "img/g0.nii.gz", "30"),
             ("sub-dup", "img/g1.nii.gz", "50"), ("sub-dup", "img/g1.nii.gz", "51"),
             ("sub-age", "img/g1.nii.gz", "-4"), ("sub-missing", "img/nope.nii.gz", "50"),
             ("sub-outside", str(outside), "50")]
    table += [(pid, str(p.relative_to(root)), "60") for pid, (p, _) in files.items()]
    manifest = root / "cohort.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["participant_id", "path", "age"])
        w.writerows(table)
    cohort = read_cohort(manifest)
    cache = tmp_path / "cache"
    s = ingest_cohort(cohort, cache, CFG, batch_size=16)  # good and bad share one batch
    # sub-g0's identical rows collapse to one; sub-dup's conflicting rows are both set aside;
    # tissue_failed needs tissue on (CFG has it off): tests/test_mri_tissue.py covers it;
    # not_skull_stripped needs a head: tests/test_whole_head.py and test_whole_head_cli.py
    assert s.quarantined == {c: 0 if c in ("tissue_failed", "not_skull_stripped")
                             else 2 if c == "duplicate_id" else 1
                             for c in QUARANTINE_CATEGORIES}
    assert s.total == 14 and s.ingested == 3 and s.failed_fraction == pytest.approx(11 / 14)
    view = open_cache(cache)
    assert view.keys == sorted(good)  # no valid subject lost
    assert view.table.column("age_censored").to_pylist() == [False, False, True]
    q = pq.read_table(find_layout(cache).quarantine_path)
    assert q.column_names[:5] == ["participant_id", "key", "source", "category", "message"]
    by_cat = {r["category"]: r for r in q.to_pylist()}
    expect_pid = {"duplicate_id": "sub-dup", "bad_age": "sub-age",
                  "missing_file": "sub-missing", "outside_root": "sub-outside",
                  "unreadable": "sub-unreadable", "wrong_dims": "sub-wrongdims",
                  "too_large": "sub-toolarge", "bad_affine": "sub-badaffine",
                  "nonfinite": "sub-nonfinite", "empty": "sub-empty"}
    assert {c: r["participant_id"] for c, r in by_cat.items()} == expect_pid
    assert all(r["message"] and r["source"] for r in q.to_pylist())
    assert "NaN" in by_cat["nonfinite"]["message"] or "nan" in by_cat["nonfinite"]["message"]
    # A rerun does not retry bad files whose stat is unchanged, and rewrites nothing.
    before = files_state(cache)
    counting = Counting()
    again = ingest_cohort(cohort, cache, CFG, preprocess=counting)
    assert counting.calls == [] and again.quarantined == s.quarantined
    assert files_state(cache) == before


def test_one_subject_crashing_never_aborts_its_batch(cohort, tmp_path):
    crash = Counting(fail_on="sub-03")
    s = ingest_cohort(cohort, tmp_path / "cache", CFG, batch_size=6, preprocess=crash)
    assert s.ingested == 5 and s.quarantined["unreadable"] == 1
    q = pq.read_table(find_layout(tmp_path / "cache").quarantine_path).to_pylist()
    assert q[0]["participant_id"] == "sub-03" and "RuntimeError" in q[0]["message"]
    assert "sub-03" not in open_cache(tmp_path / "cache").keys


def test_file_deleted_after_planning_is_missing_file(cohort, tmp_path):
    cohort.rows[4].path.unlink()
    s = ingest_cohort(cohort, tmp_path / "cache", CFG)
    assert s.quarantined["missing_file"] == 1 and s.ingested == 5


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"engine": "spark"}, "`engine`"), ({"workers": 0}, "`workers`"),
    ({"batch_size": 0}, "`batch_size`")])
def test_bad_arguments_are_refused(cohort, tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        ingest_cohort(cohort, tmp_path / "cache", CFG, **kwargs)


# ----------------------------------------------------------------------------- readers


def test_dataset_reads_lazily_from_memory_maps_and_matches_preprocessing(cohort, tmp_path):
    big = dataclasses.replace(CFG, shape=(40, 44, 36))  # 124 KiB per volume, 6 volumes
    cache = tmp_path / "cache"
    ingest_cohort(cohort, cache, big, batch_size=4)
    pool = pa.default_memory_pool()
    base = pool.bytes_allocated()
    ds = VolumeDataset(cache)
    volume_bytes = int(np.prod(big.shape)) * 2
    assert pool.bytes_allocated() - base < volume_bytes / 4  # metadata only, no volume loaded
    assert len(ds) == 6 and ds.keys == [r.key for r in cohort.rows]
    for i, row in enumerate(cohort.rows):
        item = ds[i]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (1, *big.shape)
        assert item["key"] == row.key and item["participant_id"] == row.participant_id
        assert float(item["age"]) == row.age and (item["sex"], item["site"]) == (
            row.sex, row.site)
        expected = preprocess_file(row.path, big).data
        np.testing.assert_allclose(item["image"][0].numpy(), expected, rtol=1e-3, atol=1e-3)
    assert pool.bytes_allocated() - base < volume_bytes / 4  # nothing accumulates
    assert len(ds._files) == 2  # two shards, each opened once, on first use
    loader = torch.utils.data.DataLoader(VolumeDataset(cache, split="train"), batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, *big.shape) and batch["age"].dtype == torch.float32
    assert all(k in {r.key for r in cohort.rows if r.split == "train"} for k in batch["key"])


def test_dataset_uses_memory_mapped_files(cohort, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ingest_cohort(cohort, cache, CFG)
    opened = []
    real = pa.memory_map

    def spy(path, mode="r"):
        opened.append(path)
        return real(path, mode)

    monkeypatch.setattr(pa, "memory_map", spy)
    ds = VolumeDataset(cache)
    n_meta = len(opened)
    ds[3]
    assert len(opened) == n_meta + 1 and opened[-1].endswith(".parquet")


def test_split_filter_and_unknown_split(cohort, tmp_path):
    cache = tmp_path / "cache"
    ingest_cohort(cohort, cache, CFG)
    test = VolumeDataset(cache, split="test")
    assert test.keys == ["sub-00", "sub-04"]
    assert len(VolumeDataset(cache, split=["train", "test"])) == 6
    with pytest.raises(InputError, match="`split` must be one of"):
        VolumeDataset(cache, split="validation")
    with pytest.raises(IndexError):
        test[2]


def test_open_cache_on_a_folder_without_a_cache(tmp_path):
    with pytest.raises(InputError, match="run `brainrank ingest` first"):
        open_cache(tmp_path)


@pytest.mark.slow
def test_process_pool_engine_writes_the_same_cache(cohort, tmp_path):
    a = ingest_cohort(cohort, tmp_path / "a", CFG, batch_size=2)
    b = ingest_cohort(cohort, tmp_path / "b", CFG, batch_size=2, workers=2)
    assert (a.ingested, b.ingested) == (6, 6)
    ta = open_cache(tmp_path / "a").table
    tb = open_cache(tmp_path / "b").table
    assert ta.equals(tb)
    da, db = VolumeDataset(tmp_path / "a"), VolumeDataset(tmp_path / "b")
    for i in range(6):
        np.testing.assert_array_equal(da.volume(i), db.volume(i))


@pytest.mark.ray
@pytest.mark.slow
def test_ray_engine_and_ray_data_reader_match_local(cohort, tmp_path, ray_cluster):
    from rankcore.cache import read_ray_dataset, volumes_from_batch

    local = ingest_cohort(cohort, tmp_path / "local", CFG, batch_size=2)
    remote = ingest_cohort(cohort, tmp_path / "ray", CFG, batch_size=2, engine="ray",
                           workers=2)
    assert (local.ingested, remote.ingested, remote.reused) == (6, 6, 0)
    assert open_cache(tmp_path / "local").table.equals(open_cache(tmp_path / "ray").table)
    again = ingest_cohort(cohort, tmp_path / "ray", CFG, engine="ray")
    assert (again.ingested, again.reused) == (0, 6)

    ds = read_ray_dataset(tmp_path / "ray")
    rows = sorted(ds.take_all(), key=lambda r: r["key"])
    assert [r["key"] for r in rows] == [r.key for r in cohort.rows]
    torch_ds = VolumeDataset(tmp_path / "local")
    for i, r in enumerate(rows):
        vol = decode_volume(r["volume"], r["shape"], r["volume_dtype"])
        np.testing.assert_array_equal(vol, torch_ds.volume(i))
    train = read_ray_dataset(tmp_path / "ray", split="train",
                             columns=["key", "volume", "shape", "volume_dtype"])
    assert "split" not in train.columns()
    batch = train.take_batch(10, batch_format="numpy")
    assert sorted(batch["key"]) == sorted(r.key for r in cohort.rows if r.split == "train")
    vols = volumes_from_batch(batch)
    assert vols.shape == (4, 1, *CFG.shape) and vols.dtype == np.float32
