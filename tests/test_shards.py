import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pedsynth.schemas.tables import rejects_table
from pedsynth.tasks.shards import fingerprint, run_shard, shard_paths


def _tables(n: int):
    rows = pa.table({"x": list(range(n))})
    rejects = rejects_table([{"stage": "t", "reason": "bad", "source": f"s{i}"} for i in range(2)])
    return rows, rejects


def test_fingerprint_is_order_free_and_sensitive():
    assert fingerprint(a=1, b=[1, 2]) == fingerprint(b=[1, 2], a=1)
    assert fingerprint(a=1, b=[1, 2]) != fingerprint(a=1, b=[2, 1])
    assert len(fingerprint(a=1)) == 16


def test_run_shard_computes_once_and_reuses(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return _tables(5)

    first = run_shard(tmp_path, "stage", "k", "fp1", compute)
    again = run_shard(tmp_path, "stage", "k", "fp1", compute)
    assert len(calls) == 1 and not first.reused and again.reused
    assert (again.rows, again.rejected, again.rejects_by_reason) == (5, 2, {"bad": 2})
    assert pq.read_table(first.path).column("x").to_pylist() == list(range(5))
    other = run_shard(tmp_path, "stage", "k", "fp2", compute)
    assert len(calls) == 2 and other.path != first.path


def test_failed_compute_leaves_no_output(tmp_path):
    def boom():
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError):
        run_shard(tmp_path, "stage", "k", "fp", boom)
    path, rejects = shard_paths(tmp_path, "stage", "k", "fp")
    assert not path.exists() and not rejects.exists()
    assert not list((tmp_path).rglob("*.tmp-*"))


def test_output_without_rejects_is_not_done(tmp_path):
    """Rejects are committed before the output; an output alone means a foreign or broken dir."""
    run_shard(tmp_path, "stage", "k", "fp", lambda: _tables(3))
    path, rejects = shard_paths(tmp_path, "stage", "k", "fp")
    rejects.unlink()
    redo = run_shard(tmp_path, "stage", "k", "fp", lambda: _tables(3))
    assert not redo.reused and rejects.exists()


@pytest.mark.parametrize("start, stop", [(0, 5), (990, 1010), (1000, 2000), (2400, 2500)])
def test_catalogue_slices_read_only_their_row_groups(tmp_path, start, stop, monkeypatch):
    from pedsynth.schemas.tables import CATALOG_SCHEMA
    from pedsynth.tasks.shards import write_parquet_atomic
    from pedsynth.tasks.sources import _read_rows

    rows = [
        {
            "source": f"s#{i}",
            "image_path": f"/x/{i}.jpg",
            "rel_path": f"{i}.jpg",
            "image_id": f"i{i}",
            "person_id": "p",
            "split": "train",
            "captions": ["c"],
        }
        for i in range(2500)
    ]
    path = tmp_path / "catalog.parquet"
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), path)
    assert pq.ParquetFile(path).num_row_groups == 3
    read_groups: list[int] = []
    real = pq.ParquetFile.read_row_groups

    def spy(self, row_groups, *args, **kwargs):
        read_groups.extend(row_groups)
        return real(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    got = _read_rows(str(path), start, stop)
    assert got.column("image_id").to_pylist() == [f"i{i}" for i in range(start, stop)]
    assert read_groups == list(range(start // 1000, (stop - 1) // 1000 + 1))
