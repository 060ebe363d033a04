"""`pedsynth verify` names what is wrong with a build; resume recomputes a damaged work file."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pedsynth import cli
from pedsynth.schemas.manifest import resolve_build


def _build(out: Path, source: Path) -> dict:
    from pedsynth.flows.build_dataset import build_dataset

    return build_dataset(
        config=None,
        sources=[f"cuhk-pedes:{source}"],
        out=str(out),
        overrides=["workers=2", "shard_rows=60"],
    )


@pytest.fixture(scope="module")
def built(prefect_server, procedural_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "out"
    _build(out, procedural_small)
    return out


@pytest.fixture
def copy(built, tmp_path) -> Path:
    """A copy of the build; the version folder ``latest`` names in it (verify reads that)."""
    target = tmp_path / "out"
    shutil.copytree(built, target, symlinks=True)  # `latest` stays a relative link
    return resolve_build(target)


def _verify(out: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    code = cli.main(["verify", str(out), *extra])
    return code, capsys.readouterr().out.strip().splitlines()


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x5A
    path.write_bytes(bytes(data))


def test_a_sound_build_verifies(copy, capsys):
    code, lines = _verify(copy, capsys)
    assert code == 0, lines
    assert lines == [lines[-1]] and "sound" in lines[-1]
    pairs = _manifest(copy)["totals"]["pairs"]
    assert f"{pairs} pairs" in lines[-1]
    code, lines = _verify(copy, capsys, "--json")
    report = json.loads("\n".join(lines))
    assert code == 0 and report["sound"] is True and report["problems"] == []
    assert report["checked"]["pairs"] == pairs and report["checked"]["images"] > 0


def test_verify_of_the_output_folder_reads_the_version_latest_names(copy, capsys):
    out = copy.parent.parent
    assert copy.parent.name == "versions" and (out / "latest").is_symlink()
    code, lines = _verify(out, capsys)
    assert code == 0 and lines == [lines[-1]] and lines[-1].startswith(f"{copy}: sound"), lines
    _flip(copy / _manifest(copy)["shards"][0]["path"])
    code, lines = _verify(out, capsys)
    assert code == 1 and lines[0].startswith(f"{copy}/data/"), lines


def test_a_flipped_byte_in_a_shard_is_named(copy, capsys):
    shard = _manifest(copy)["shards"][0]["path"]
    _flip(copy / shard)
    code, lines = _verify(copy, capsys)
    assert code == 1
    named = [line for line in lines if line.startswith(f"{copy / shard}: ")]
    assert any("sha256" in line for line in named), lines
    others = [line for line in lines[:-1] if line not in named]
    assert all(line.startswith(f"{copy / 'manifest.json'}: totals say") for line in others)


def test_a_deleted_shard_is_named(copy, capsys):
    shard = _manifest(copy)["shards"][-1]["path"]
    (copy / shard).unlink()
    code, lines = _verify(copy, capsys)
    assert code == 1
    assert f"{copy / shard}: missing (named by the manifest)" in lines
    assert any("totals say" in line for line in lines)  # the pairs no longer add up


def test_extra_and_leftover_temporary_files_are_named(copy, capsys):
    first = copy / _manifest(copy)["shards"][0]["path"]
    shutil.copy(first, copy / "data" / "train-00099-of-00100.parquet")
    (copy / "data" / f".{first.name}.tmp-123-abcdef01").write_bytes(b"half")
    code, lines = _verify(copy, capsys)
    assert code == 1
    assert f"{copy}/data/train-00099-of-00100.parquet: a file the manifest does not name" in lines
    assert any(
        line.startswith(f"{copy}/data/.{first.name}.tmp-123-abcdef01: a temporary file")
        for line in lines
    ), lines


def _rewrite_shard(out: Path, index: int, change) -> tuple[str, dict]:
    """Replace shard ``index`` with ``change(table)`` and keep the manifest's sha256 and rows
    in step, so only the damage inside the rows remains to be found."""
    from pedsynth.tasks.shards import file_sha256, write_parquet_atomic

    manifest = _manifest(out)
    entry = manifest["shards"][index]
    table, detail = change(pq.read_table(out / entry["path"]))
    write_parquet_atomic(table, out / entry["path"])
    entry["sha256"], entry["rows"] = file_sha256(out / entry["path"]), table.num_rows
    (out / "manifest.json").write_text(json.dumps(manifest))
    return entry["path"], detail


def test_a_truncated_image_is_named(copy, capsys):
    def truncate(table: pa.Table):
        rows = table.to_pylist()
        rows[0]["image"]["bytes"] = rows[0]["image"]["bytes"][: len(rows[0]["image"]["bytes"]) // 2]
        return pa.Table.from_pylist(rows, schema=table.schema), rows[0]["image_id"]

    shard, image_id = _rewrite_shard(copy, 0, truncate)
    code, lines = _verify(copy, capsys)
    assert code == 1
    problems = [line for line in lines if line.startswith(f"{copy / shard}: image {image_id} ")]
    assert len(problems) == 1 and "does not decode" in problems[0], lines


def test_the_check_before_latest_moves_reads_checksums_not_pixels(copy):
    """The build's own check (``decode_images=False``) still finds a damaged file, and leaves
    the decoding of every image to ``pedsynth verify``."""
    from pedsynth.schemas.manifest import resolve_build
    from pedsynth.verify import verify

    full, quick = verify(copy), verify(copy, decode_images=False)
    assert full.sound and quick.sound
    assert full.images > 0 and quick.images == 0
    version = resolve_build(copy)
    _flip(version / _manifest(version)["shards"][0]["path"])
    assert not verify(copy, decode_images=False).sound


def test_a_repeated_pair_id_and_a_wrong_schema_are_named(copy, capsys):
    manifest = _manifest(copy)
    other = pq.read_table(copy / manifest["shards"][1]["path"])
    repeated = other.column("pair_id")[0].as_py()

    def repeat(table: pa.Table):
        return pa.concat_tables([table, other.slice(0, 1)]), None

    shard, _ = _rewrite_shard(copy, 0, repeat)
    code, lines = _verify(copy, capsys)
    assert code == 1
    assert any(
        line.startswith(f"{copy / manifest['shards'][1]['path']}: pair_id {repeated} already in")
        or line.startswith(f"{copy / shard}: pair_id {repeated} already in")
        for line in lines
    ), lines

    def drop_column(table: pa.Table):
        return table.drop_columns(["clip_score"]), None

    shard, _ = _rewrite_shard(copy, 1, drop_column)
    code, lines = _verify(copy, capsys)
    assert f"{copy / shard}: schema differs from the pairs schema: missing clip_score" in lines


def test_a_memory_index_with_the_wrong_count_is_named(copy, capsys):
    import faiss

    pairs = _manifest(copy)["totals"]["pairs"]
    folder = copy / "memory"
    folder.mkdir()
    images = faiss.IndexFlatIP(4)
    images.add(np.ones((5, 4), np.float32))
    captions = faiss.IndexFlatIP(4)
    captions.add(np.ones((pairs - 1, 4), np.float32))
    faiss.write_index(images, str(folder / "images.faiss"))
    faiss.write_index(captions, str(folder / "captions.faiss"))
    (folder / "memory.json").write_text(json.dumps({"counts": {"images": 5}}))
    code, lines = _verify(copy, capsys)
    assert code == 1
    assert lines[:-1] == [
        f"{folder / 'captions.faiss'}: holds {pairs - 1} vectors, the manifest's pairs say {pairs}"
    ]


def test_not_a_build_is_one_error_line(tmp_path, capsys):
    code = cli.main(["verify", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"error: {tmp_path / 'manifest.json'} not found (is {tmp_path} a finished "
                   "pedsynth build?)"]  # fmt: skip


def _pairs(out: Path) -> pa.Table:
    table = pq.read_table(resolve_build(out) / "data").combine_chunks()
    return table.take(pc.sort_indices(table, [("pair_id", "ascending")]))


def test_resume_recomputes_a_damaged_work_shard(copy, built, procedural_small, caplog):
    version, copy = copy, copy.parent.parent  # the build runs on the output folder
    ingest = sorted(
        p for p in (copy / "_work" / "ingest").glob("*.parquet") if "rejects" not in p.name
    )
    assert len(ingest) >= 3
    damaged = ingest[1]
    _flip(damaged)
    with pytest.raises((OSError, ValueError, pa.ArrowException)):
        pq.read_table(damaged, page_checksum_verification=True)
    (version / "manifest.json").unlink()  # so the write stage writes the dataset again
    shutil.rmtree(version / "data")
    with caplog.at_level(logging.WARNING, logger="pedsynth.tasks.shards"):
        manifest = _build(copy, procedural_small)
    warnings = [r.getMessage() for r in caplog.records if r.name == "pedsynth.tasks.shards"]
    assert [w for w in warnings if str(damaged) in w and "computing it again" in w], warnings
    assert not [w for w in warnings if str(damaged) not in w]  # no other file was redone
    ingest_counts = manifest["stages"]["ingest"]
    assert ingest_counts["reused"] == ingest_counts["shards"] - 1
    pq.read_table(damaged, page_checksum_verification=True)  # whole again
    assert resolve_build(copy) != version and not version.exists()  # a new one, the old pruned
    assert _pairs(copy).equals(_pairs(built))
