"""Output and sources on an fsspec store, here ``memory://`` (one process, no server): the
working folder, the commit order, resume from the store, publishing only what verifies.
The same code against a real S3 server: tests/test_storage_s3.py."""

from __future__ import annotations

import fsspec
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from pedsynth import storage
from pedsynth.errors import PreflightError
from pedsynth.schemas.manifest import Manifest, latest_version, resolve_build
from pedsynth.verify import verify
from tests.test_build import run_build


@pytest.fixture()
def memory_fs():
    fs = fsspec.filesystem("memory")
    yield fs
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")


def test_local_paths_stay_local_and_urls_get_a_working_folder(tmp_path):
    assert not storage.is_url("out/x") and not storage.is_url("/abs/x")
    assert not storage.is_url("file:///abs/x")
    assert storage.is_url("s3://bucket/x") and storage.is_url("memory://x")
    assert storage.working_folder("out/x") == storage.Path("out/x")
    a = storage.working_folder("s3://bucket/a", tmp_path)
    b = storage.working_folder("s3://bucket/b", tmp_path)
    assert a.parent == tmp_path and a != b  # one folder per URL
    assert storage.working_folder("s3://bucket/a", tmp_path) == a  # and the same one again


def test_sync_up_sends_rejects_before_their_outputs(memory_fs, tmp_path):
    local = tmp_path / "work"
    stage = local / "_work" / "ingest"
    stage.mkdir(parents=True)
    for key in ("a", "b"):
        (stage / f"{key}.fp.parquet").write_bytes(b"output " + key.encode())
        (stage / f"{key}.fp.rejects.parquet").write_bytes(b"rejects " + key.encode())
    mirror = storage.Mirror("memory://store/x", local)
    sent: list[str] = []
    real_push = mirror.push

    def recording_push(*paths):
        sent.extend(p.name for p in paths)
        real_push(*paths)

    object.__setattr__(mirror, "push", recording_push)
    assert mirror.sync_up("_work") == 4
    assert [n.endswith(".rejects.parquet") for n in sent] == [True, True, False, False]
    assert memory_fs.cat_file("/store/x/_work/ingest/a.fp.parquet") == b"output a"
    assert mirror.sync_up("_work") == 0  # the store has them all now

    fresh = storage.Mirror("memory://store/x", tmp_path / "other-machine")
    assert fresh.pull() == 4
    assert (fresh.local / "_work/ingest/b.fp.rejects.parquet").read_bytes() == b"rejects b"
    assert fresh.pull() == 0  # nothing new


def test_build_into_a_store_publishes_a_verified_version(
    memory_fs, prefect_server, procedural_small, tmp_path, monkeypatch
):
    monkeypatch.setenv("PEDSYNTH_CACHE_DIR", str(tmp_path / "cache"))
    out = "memory://builds/nightly"
    manifest = run_build(out, [f"cuhk-pedes:{procedural_small}"], "shard_rows=50")
    version = manifest["version"]
    assert latest_version(out) == version
    assert memory_fs.cat_file("/builds/nightly/latest").decode().strip() == f"versions/{version}"
    assert resolve_build(out) == f"{out}/versions/{version}"
    report = verify(out)
    assert report.sound and report.pairs == manifest["totals"]["pairs"] > 0
    stored = Manifest.load(out)
    assert stored is not None and stored.build_fingerprint == manifest["build_fingerprint"]
    first = stored.shards[0]
    with memory_fs.open(f"/builds/nightly/versions/{version}/{first.path}", "rb") as fh:
        assert pq.read_table(fh).num_rows == first.rows
    local = storage.working_folder(out)
    assert (local / "versions" / version / first.path).is_file()  # the working copy

    # A second machine (an empty cache) resumes from the store: nothing is recomputed, since
    # the same source files on this disk give the same fingerprints.
    monkeypatch.setenv("PEDSYNTH_CACHE_DIR", str(tmp_path / "cache-2"))
    again = run_build(out, [f"cuhk-pedes:{procedural_small}"], "shard_rows=50")
    assert again["reused"] and again["version"] == version
    assert all(c["reused"] == c["shards"] for c in again["stages"].values())


def test_a_version_that_does_not_verify_in_the_store_is_not_published(
    memory_fs, prefect_server, procedural_small, tmp_path, monkeypatch
):
    monkeypatch.setenv("PEDSYNTH_CACHE_DIR", str(tmp_path / "cache"))
    out = "memory://builds/broken"
    manifest = run_build(out, [f"cuhk-pedes:{procedural_small}"], "shard_rows=50")
    version = manifest["version"]
    memory_fs.rm_file("/builds/broken/latest")
    memory_fs.rm(f"/builds/broken/versions/{version}", recursive=True)
    shard = storage.working_folder(out) / "versions" / version / manifest["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the working copy no longer matches its manifest
    shard.write_bytes(bytes(data))
    mirror = storage.Mirror(out, storage.working_folder(out))
    with pytest.raises(RuntimeError, match="does not verify in the store.*sha256"):
        mirror.publish(version)
    assert latest_version(out) is None


def test_credentials_block_fields_become_client_options():
    class Parameters:
        endpoint_url = "http://127.0.0.1:9000"

    class AwsCredentials:  # the fields of prefect-aws's block
        aws_access_key_id = "AKIA-TEST"
        aws_secret_access_key = SecretStr("very-secret")
        aws_session_token = None
        region_name = "eu-west-1"
        aws_client_parameters = Parameters()

    options = storage.block_options(AwsCredentials())
    assert options == {
        "key": "AKIA-TEST",
        "secret": "very-secret",
        "client_kwargs": {"region_name": "eu-west-1", "endpoint_url": "http://127.0.0.1:9000"},
    }
    with pytest.raises(PreflightError, match="AwsCredentials"):
        storage.block_options(object())


def test_an_unknown_protocol_is_one_line():
    with pytest.raises(PreflightError, match="nosuchfs://x"):
        storage.url_fs("nosuchfs://x")


def test_a_store_lock_refuses_a_second_build_and_recovers_a_dead_ones(memory_fs):
    import json
    import socket
    import time

    from pedsynth.lock import store_lock

    url = "memory://builds/locked"
    with store_lock(url):
        held = json.loads(memory_fs.cat_file("/builds/locked/.pedsynth.lock"))
        assert held["host"] == socket.gethostname() and held["pid"] > 0
        refused = pytest.raises(PreflightError, match=f"pid {held['pid']} on host {held['host']}")
        with refused, store_lock(url):
            pass
    assert not memory_fs.exists("/builds/locked/.pedsynth.lock")  # released

    gone = {"host": "worker-7", "pid": 4242, "started": "2026-01-01T00:00:00+00:00"}
    memory_fs.pipe_file(
        "/builds/locked/.pedsynth.lock", json.dumps({**gone, "heartbeat": 0}).encode()
    )
    with store_lock(url):  # its heartbeat stopped long ago: recovered
        assert json.loads(memory_fs.cat_file("/builds/locked/.pedsynth.lock"))["pid"] != 4242
    alive = {**gone, "heartbeat": time.time()}
    memory_fs.pipe_file("/builds/locked/.pedsynth.lock", json.dumps(alive).encode())
    with pytest.raises(PreflightError, match="worker-7"), store_lock(url):  # still beating
        pass
