"""runner: ray — the same build-dataset flow on a real local Ray cluster.

The cluster is started inside the test (``ray.init(num_cpus=2)``, no dashboard); the build with
a model stage on a tiny model must equal the thread-pool build row for row, even with one Ray
worker process SIGKILLed in the middle of a shard, and no worker may load an engine twice.
The cluster tests are marked ``ray`` and left out of the default run; CI installs the ``ray``
extra and runs them (``pytest -m ray``).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pedsynth.runners import LoadReport, engine_loads, stage_resources
from pedsynth.schemas.config import BuildConfig

# Caption only (tiny random LLaVA): the model stage; rewrite/faithfulness add nothing here.
OVERRIDES = ["shard_rows=30", "rewrite=", "faithfulness=", "write.card_plots=false"]


# ------------------------------------------------------------------ config to Ray options


def _cfg(**sections) -> BuildConfig:
    return BuildConfig.model_validate({"runner": "ray", **sections})


def test_cpu_stages_ask_for_no_gpu_and_engines_for_theirs():
    cfg = _cfg(
        caption={"engine": {"backend": "vllm", "model": "m", "vllm": {"tensor_parallel_size": 2}}},
        rewrite={"engine": {"backend": "transformers", "model": "m", "device": "cuda"}},
        ray={"stages": {"write": {"num_cpus": 2, "memory": "512MiB"}}},
    )
    assert stage_resources(cfg, "ingest") == {"num_cpus": 1, "num_gpus": 0, "max_retries": 3}
    assert stage_resources(cfg, "write") == {
        "num_cpus": 2,
        "num_gpus": 0,
        "max_retries": 3,
        "memory": 512 * 1024 * 1024,
    }
    # GPU tasks keep their worker (and its models) across shards: Ray's default is one call.
    assert stage_resources(cfg, "caption") == {
        "num_cpus": 1,
        "num_gpus": 2,
        "max_retries": 3,
        "max_calls": 0,
    }
    assert stage_resources(cfg, "rewrite")["num_gpus"] == 1


def test_a_tensor_parallel_engine_refuses_too_few_gpus_and_unknown_stages_are_refused():
    cfg = _cfg(
        caption={"engine": {"backend": "vllm", "model": "m", "vllm": {"tensor_parallel_size": 4}}},
        ray={"stages": {"caption": {"num_gpus": 2}}},
    )
    with pytest.raises(ValueError, match="needs 4 GPUs on one node"):
        stage_resources(cfg, "caption")
    with pytest.raises(ValueError, match="no stage named 'captoin'"):
        _cfg(ray={"stages": {"captoin": {}}})
    with pytest.raises(ValueError, match="expected bytes"):
        _cfg(ray={"stages": {"write": {"memory": "lots"}}})


def test_engine_loads_count_each_worker_once_when_its_tasks_overlap():
    a, b = "host:1", "host:2"
    reports = [  # two overlapping tasks on worker 1 both see its one load; worker 2 loads once
        LoadReport(a, {}, {'["engine","x"]': 1}),
        LoadReport(a, {}, {'["engine","x"]': 1}),
        LoadReport(a, {'["engine","x"]': 1}, {'["engine","x"]': 1}),
        LoadReport(b, {'["stage","y"]': 1}, {'["stage","y"]': 1, '["engine","x"]': 1}),
    ]
    loads = engine_loads(reports)
    assert sorted(loads) == [a, b]
    assert list(loads[a].values()) == [1] and list(loads[b].values()) == [1]
    assert next(iter(loads[a])).startswith("engine:x#")


# ------------------------------------------------------------------ a real local cluster


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for this module (skipped without the ``ray`` extra)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("prefect_ray")
    ray.init(num_cpus=2, include_dashboard=False, namespace="pedsynth", log_to_driver=False)
    yield ray
    ray.shutdown()


def _shard_task_pids() -> list[int]:
    """Ray worker processes running a shard-stage task now (Ray titles them ``ray::NAME``)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and cmd[0].startswith("ray::shard-stage"):
            pids.append(proc.pid)
    return pids


class _KillOneCaptionWorker(threading.Thread):
    """SIGKILLs one Ray worker 0.3 s into a caption shard. Once the first caption shard is
    committed, every shard task still running is a caption task (ingest finished before the
    stage began, write is a dataset task), and shards are left: 8 of them on 2 workers."""

    def __init__(self, out: Path):
        super().__init__(daemon=True)
        self.out = out
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        seen: dict[int, float] = {}
        while not self.stop.is_set() and self.killed is None:
            committed = (self.out / "_work" / "caption").glob("*.parquet")
            if any(".rejects." not in p.name for p in committed):
                now = time.monotonic()
                seen = {pid: seen.get(pid, now) for pid in _shard_task_pids()}
                for pid, since in seen.items():
                    if now - since >= 0.3:
                        os.kill(pid, signal.SIGKILL)
                        self.killed = pid
                        break
            time.sleep(0.02)


def _rows(out: Path) -> list[dict]:
    table = pq.read_table(out / "latest" / "data")
    return sorted(table.to_pylist(), key=lambda r: r["pair_id"])


@pytest.mark.slow
@pytest.mark.ray
def test_ray_build_equals_the_thread_build_with_a_worker_killed_mid_shard(
    prefect_server, procedural_small, tmp_path, ray_cluster
):
    from pedsynth.flows.build_dataset import build_dataset

    def build(out: Path, runner: str) -> dict:
        return build_dataset(
            config="configs/offline-tiny.yaml",
            sources=[f"cuhk-pedes:{procedural_small}"],
            out=str(out),
            overrides=[*OVERRIDES, f"runner={runner}"],
        )

    thread = build(tmp_path / "thread", "thread")
    assert thread["stages"]["caption"]["shards"] >= 6  # enough left to kill one mid-way

    killer = _KillOneCaptionWorker(tmp_path / "ray")
    killer.start()
    try:
        on_ray = build(tmp_path / "ray", "ray")
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "no Ray worker was running a shard to kill"

    expected, got = _rows(tmp_path / "thread"), _rows(tmp_path / "ray")
    assert [r["pair_id"] for r in got] == [r["pair_id"] for r in expected]
    assert got == expected
    assert any(r["caption_source"] == "mllm" for r in got)  # the model stage wrote rows

    # Engine loads reach the manifest; on Ray they happen in worker processes, never the
    # driver, and at most once per worker per engine over the whole build.
    driver = f"{os.uname().nodename}:{os.getpid()}"
    thread_caption = thread["stages"]["caption"]["engine_loads"]
    assert list(thread_caption) == [driver]
    per_worker: dict[tuple[str, str], int] = {}
    for counts in on_ray["stages"].values():
        for where, engines in counts["engine_loads"].items():
            for engine, n in engines.items():
                per_worker[(where, engine)] = per_worker.get((where, engine), 0) + n
    caption_loads = on_ray["stages"]["caption"]["engine_loads"]
    assert caption_loads and driver not in caption_loads
    # The killed worker reports loads only for shards it finished before it died (it may have
    # finished none); the worker that ran its shard again loaded the engine once, like any.
    killed_loads = caption_loads.get(f"{os.uname().nodename}:{killer.killed}", {})
    assert all(n == 1 for n in killed_loads.values())
    assert any("tiny-random:llava" in e for engines in caption_loads.values() for e in engines)
    assert per_worker and max(per_worker.values()) == 1


def _sleep_and_say_where(seconds: float) -> tuple[float, float, dict]:
    import ray

    started = time.monotonic()
    time.sleep(seconds)
    return started, time.monotonic(), ray.get_runtime_context().get_assigned_resources()


@pytest.mark.ray
def test_stage_resources_reach_ray_and_bound_the_shards_in_flight(prefect_server, ray_cluster):
    from prefect import flow, task
    from prefect_ray import RayTaskRunner

    from pedsynth.runners import stage_options

    cfg = _cfg(ray={"stages": {"write": {"num_cpus": 2}, "ingest": {"num_cpus": 1}}})
    sleeper = task(_sleep_and_say_where, name="sleeper")

    @flow(task_runner=RayTaskRunner())
    def run(stage: str, n: int) -> list:
        with stage_options(cfg, stage):
            futures = [sleeper.submit(0.4) for _ in range(n)]
        return [f.result() for f in futures]

    def most_at_once(spans: list) -> int:
        return max(sum(1 for s, e, _ in spans if s <= t < e) for t, _, _ in spans)

    wide = run("write", 3)  # two CPUs each on a two-CPU cluster: one at a time
    assert all(res == {"CPU": 2.0} for _, _, res in wide)
    assert most_at_once(wide) == 1
    narrow = run("ingest", 4)
    assert all(res == {"CPU": 1.0} for _, _, res in narrow)
    assert most_at_once(narrow) <= 2
