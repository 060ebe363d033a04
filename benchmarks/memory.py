"""Memory stage (RAR) against faiss alone: same vectors, same index type, same k.

Contenders, on the same ingested procedural shards (4 images per identity, 2 captions each):

* **memory stage**: ``MemoryStage`` through the registry as the flow runs it (a fresh output
  folder each time): embeds every distinct image once and every caption with the CLIP engine,
  builds the image and caption ``IndexHNSWFlat`` indexes, finds near-duplicates, fills hard
  negatives, measures recall, writes ``memory/`` and one output shard per input.
* **engine + faiss alone**: the same engine embedding the same images and captions in the same
  batches, then faiss by hand on those vectors: both ``IndexHNSWFlat`` (same M,
  efConstruction, efSearch), the image self-search for duplicates (same k), the caption →
  image search restricted to the caption's split (k hard negatives plus the identity's own
  images), and the exact ``IndexFlatIP`` recall check on the same number of queries.

The embeddings are timed on their own too, so the stage's time beyond them can be set against
faiss's. Runs alternate; the fastest of ``--repeats`` counts. Goal: stage ≥ 0.9× the speed of
engine + faiss alone.

    python benchmarks/memory.py --quick
    python benchmarks/memory.py --images 800 --write
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from report import (  # benchmarks/report.py
    Figure,
    machine_line,
    markdown_table,
    print_run,
    write_section,
)

SECTION = "memory"
GOAL = 0.9


def ingest_shards(root: Path, images: int, shard_rows: int) -> list:
    """Ingested pairs shards of ``images`` procedural images (4 per identity, 2 captions)."""
    from pedsynth.procedural import generate
    from pedsynth.schemas.config import IngestConfig, SourceConfig
    from pedsynth.tasks import sources

    bench = root / "bench"
    generate(bench, identities=max(2, images // 4), images_per_identity=4, seed=5)
    chunks, _ = sources.plan_chunks(
        SourceConfig(format="cuhk-pedes", path=str(bench)), root / "ingest", shard_rows
    )
    return [sources.ingest_chunk(c, IngestConfig(), root / "ingest") for c in chunks]


def faiss_alone(img_vecs, img_person, img_split, cap_vecs, cap_person, cap_split, cfg) -> None:
    """The index work of the stage, by hand with faiss on the same normalised vectors."""
    import faiss

    def hnsw(vecs: np.ndarray):
        index = faiss.IndexHNSWFlat(vecs.shape[1], cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = cfg.ef_construction, cfg.ef_search
        index.add(vecs)
        return index

    order = np.argsort(np.asarray(img_split), kind="stable")  # a split is an id range
    img_vecs, img_split = img_vecs[order], [img_split[i] for i in order]
    img_person = [img_person[i] for i in order]
    images, captions = hnsw(img_vecs), hnsw(cap_vecs)
    images.search(img_vecs, cfg.duplicate_neighbours + 1)
    per_person: dict[tuple[str, str], int] = {}
    for person, split in zip(img_person, img_split, strict=True):
        per_person[(split, person)] = per_person.get((split, person), 0) + 1
    for split in sorted(set(img_split)):
        lo, hi = img_split.index(split), len(img_split) - img_split[::-1].index(split)
        members = [i for i, s in enumerate(cap_split) if s == split]
        k = cfg.hard_negatives_k + max(per_person[(split, cap_person[i])] for i in members)
        params = faiss.SearchParametersHNSW(efSearch=max(cfg.ef_search, k))
        params.sel = faiss.IDSelectorRange(lo, hi)
        images.search(cap_vecs[members], k, params=params)
    sample = np.random.default_rng(0).choice(
        len(cap_vecs), min(cfg.recall_queries, len(cap_vecs)), replace=False
    )
    exact = faiss.IndexFlatIP(img_vecs.shape[1])
    exact.add(img_vecs)
    exact.search(cap_vecs[sample], 10)
    images.search(cap_vecs[sample], 10)
    del captions


def measure(args: argparse.Namespace) -> dict:
    import pyarrow as pa

    from pedsynth.engines.clip import load_clip
    from pedsynth.schemas.vision import ClipModelConfig, MemoryConfig
    from pedsynth.tasks.memory_index import normalize
    from pedsynth.tasks.shards import read_shard
    from pedsynth.tasks.stages import StageContext, run_dataset_stage

    clip = ClipModelConfig(model=args.model, pretrained="random", batch_size=args.batch_size)
    cfg = MemoryConfig(clip=clip)
    engine = load_clip(clip)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = ingest_shards(root, args.images, args.shard_rows)
        table = pa.concat_tables(
            [read_shard(s, columns=["image_id", "person_id", "split", "caption", "image"])
             for s in shards]
        )  # fmt: skip
        image_ids = table.column("image_id").to_pylist()
        first = list({image_id: i for i, image_id in reversed(list(enumerate(image_ids)))}.values())
        first.sort()
        image_bytes = [table.column("image")[i]["bytes"].as_py() for i in first]
        img_person = [table.column("person_id")[i].as_py() for i in first]
        img_split = [table.column("split")[i].as_py() for i in first]
        captions = table.column("caption").to_pylist()
        cap_person = table.column("person_id").to_pylist()
        cap_split = table.column("split").to_pylist()

        def embed() -> tuple[np.ndarray, np.ndarray]:
            vecs = [
                normalize(engine.encode_images(image_bytes[s : s + args.batch_size]).pooled)
                for s in range(0, len(image_bytes), args.batch_size)
            ]
            return np.concatenate(vecs), normalize(engine.encode_texts(captions).pooled)

        runs = iter(range(10**6))

        def stage() -> None:
            context = StageContext(
                out_dir=str(root / f"out{next(runs)}"), fingerprint="bench", shard_rows=10**6
            )
            run_dataset_stage("memory", cfg, 0, shards, context)

        img_vecs, cap_vecs = embed()  # warm-up, and the vectors faiss alone indexes
        stage()
        best = {"stage": float("inf"), "embed": float("inf"), "faiss": float("inf")}
        for _ in range(args.repeats):
            for name, fn in (
                ("stage", stage),
                ("embed", embed),
                ("faiss", lambda: faiss_alone(img_vecs, img_person, img_split, cap_vecs,
                                              cap_person, cap_split, cfg)),
            ):  # fmt: skip
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return best | {"images": len(image_bytes), "captions": len(captions), "cfg": cfg}


def run(argv: list[str] | None = None) -> tuple[str, list[Figure]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--model", default="pedsynth-tiny-clip")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-rows", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="120 images, 1 repeat")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 120, 1
    r = measure(args)
    cfg = r["cfg"]
    baseline = r["embed"] + r["faiss"]
    ratio = baseline / r["stage"]
    beyond = r["stage"] - r["embed"]
    rows = [
        ("engine embeddings + faiss alone", f"{baseline:.2f}", "1.00×"),
        ("memory stage", f"{r['stage']:.2f}", f"**{ratio:.2f}×**"),
        ("— engine embeddings alone", f"{r['embed']:.2f}", ""),
        ("— faiss alone", f"{r['faiss']:.2f}", ""),
        ("— stage beyond its embeddings", f"{beyond:.2f}", ""),
    ]
    command = "python benchmarks/memory.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    body = (
        "## Memory stage against faiss alone (`benchmarks/memory.py`)\n\n"
        f"{r['images']:,} procedural images (4 per identity) and {r['captions']:,} captions in "
        f"{args.shard_rows}-row shards, `{args.model}` (random weights, batch "
        f"{args.batch_size}, CPU). *Memory stage*: `MemoryStage` through the registry, fresh "
        "output folder each run (embeddings, two `IndexHNSWFlat`, duplicates, hard negatives, "
        "recall, `memory/` and the output shards written). *Baseline*: the same engine "
        "embedding the same images and captions, then faiss by hand on those vectors: the "
        f"same two indexes (M {cfg.hnsw_m}, efConstruction {cfg.ef_construction}, efSearch "
        f"{cfg.ef_search}), the image self-search (k {cfg.duplicate_neighbours + 1}), the "
        f"split-restricted caption → image search (k {cfg.hard_negatives_k} + the identity's "
        "own images) and the exact recall check. Fastest of "
        f"{args.repeats} alternating runs; ratio = baseline time / stage time (goal ≥ {GOAL}×)."
        "\n\n"
        + markdown_table(("run", "seconds", "speed vs baseline"), rows, "lrr")
        + f"\n{machine_line(('torch', 'faiss'))}\n\nCommand: `{command.strip()}`\n"
    )
    figures = [
        Figure("memory", "memory stage", ratio, GOAL, True,
               "the same CLIP embeddings + faiss alone (same vectors, index type, k)"),
    ]  # fmt: skip
    if args.write:
        write_section(SECTION, body)
    return body, figures


if __name__ == "__main__":
    raise SystemExit(print_run(run))
