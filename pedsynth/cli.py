"""The ``pedsynth`` command: sample-data, build, inspect."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pedsynth import errors
from pedsynth.errors import PreflightError
from pedsynth.preflight import check_build
from pedsynth.redact import install_log_redaction
from pedsynth.schemas.config import SOURCE_FORMATS, load_config
from pedsynth.schemas.manifest import Manifest


def _sample_data(args: argparse.Namespace) -> int:
    from pedsynth.procedural import generate

    summary = generate(
        args.out,
        identities=args.identities,
        images_per_identity=args.images_per_identity,
        seed=args.seed,
        split_fractions=_fractions(args.splits),
        workers=args.workers,
        overwrite=args.overwrite,
    )
    from pedsynth.procedural.references import write_benchmark_references

    summary["references"] = len(write_benchmark_references(args.out)["references"])
    print(json.dumps(summary, indent=2))
    return 0


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise PreflightError(
            f"--splits {text!r}: expected TRAIN,VAL,TEST shares, e.g. 0.8,0.1,0.1"
        ) from None


def _build(args: argparse.Namespace) -> int:
    # Validate and check paths before starting Prefect, so a typo costs a second, not a
    # server start, and ends in one line that says what to fix.
    cfg = load_config(args.config, sources=args.source, out=args.out, overrides=args.set)
    check_build(cfg)
    from pedsynth.flows.build_dataset import build_dataset  # sets up Prefect's logging
    from pedsynth.lock import build_lock
    from pedsynth.server_process import own_ephemeral_server

    # The lock before any write (a second build refuses or waits); a temporary Prefect server
    # of our own that dies with this process, however it dies.
    from pedsynth.storage import working_folder

    work = working_folder(cfg.out, cfg.storage.cache_dir)  # `out`, or its local copy for a URL
    with build_lock(work, wait=args.wait), own_ephemeral_server(work):
        errors.start_log_file(work, "build", debug=args.debug)
        errors.quiet_prefect_tracebacks(debug=args.debug)
        manifest = build_dataset(
            config=args.config,
            sources=args.source,
            out=args.out,
            overrides=args.set,
            show_progress=sys.stderr.isatty(),
        )
    print(summarize(Manifest.model_validate(manifest), reused=manifest.get("reused", False)))
    return 0


def summarize(manifest: Manifest, *, reused: bool = False) -> str:
    """A few lines a person can read: counts per split and stage, rejects by reason."""
    t = manifest.totals
    lines = [
        f"{manifest.name}  schema {manifest.schema_version}  "
        f"code {manifest.code_version}  created {manifest.created}",
        f"{t.pairs} pairs, {t.images} images, {t.identities} identities, "
        f"{t.rejects} rejects, {len(manifest.shards)} shards"
        + ("  (already built: nothing to do)" if reused else ""),
    ]
    for split, v in t.by_split.items():
        lines.append(
            f"  {split:<6} {v.pairs:>8} pairs {v.images:>8} images {v.identities:>7} identities"
        )
    lines.append(
        f"  {'stage':<12} {'rows in':>8} {'rows out':>9} {'rejected':>9} {'reused':>9} {'time':>9}"
    )
    for stage, c in manifest.stages.items():
        reasons = ", ".join(f"{k}={v}" for k, v in c.rejects_by_reason.items())
        lines.append(
            f"  {stage:<12} {c.rows_in:>8} {c.rows_out:>9} {c.rejected:>9} "
            f"{f'{c.reused}/{c.shards}':>9} {c.seconds:>8.1f}s"
            + (f"  ({reasons})" if reasons else "")
        )
    for stage, c in manifest.stages.items():
        if c.prompt_tokens or c.completion_tokens:
            rate = f", {c.tokens_per_s:,.0f} completion tokens/s" if c.tokens_per_s else ""
            lines.append(
                f"  {stage:<12} tokens: {c.prompt_tokens:,} prompt, "
                f"{c.completion_tokens:,} completion{rate}"
            )
    for stage, c in manifest.stages.items():
        if c.failed:
            lines.append(
                f"warning: {stage}: {c.failed} of {c.requests} requests failed "
                f"({c.failure_rate:.1%}); run the build again to send them again"
            )
    if t.identities_in_several_splits:
        lines.append(
            f"warning: {t.identities_in_several_splits} identities are in more than one split"
        )
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    try:
        manifest = Manifest.load(args.out)
    except ValueError as exc:
        raise PreflightError(f"{args.out}: manifest.json cannot be read: {exc}") from None
    if manifest is None:
        raise PreflightError(
            f"{Path(args.out) / 'manifest.json'} not found "
            f"(is {args.out} a finished pedsynth build?)"
        )
    print(
        json.dumps(manifest.model_dump(mode="json"), indent=2) if args.json else summarize(manifest)
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pedsynth.verify import verify

    report = verify(args.out)  # not a build: a one-line error (main)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for problem in report.problems:
            print(problem.line(report.out))
        print(report.summary())
    return 0 if report.sound else 1


def _search(args: argparse.Namespace) -> int:
    from pedsynth.search import search

    hits = search(args.out, args.text, args.k, split=args.split)  # errors: see main()
    if args.json:
        print(json.dumps(hits, indent=2))
        return 0
    for hit in hits:
        print(
            f"{hit['rank']:>3}  score {hit['score']:.4f}  {hit['image_id']}  "
            f"person {hit['person_id']}  ({hit['split']})"
        )
        for caption in hit["captions"]:
            print(f"       - {caption}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pedsynth.export.layouts import export_layout

    summary = export_layout(
        args.out,
        args.dir,
        args.format,
        caption_sources=args.caption_source,
        overwrite=args.overwrite,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _export_ranking(args: argparse.Namespace) -> int:
    from pedsynth.export.ranking import export_ranking

    summary = export_ranking(
        args.out,
        args.dir,
        k=args.k,
        split=args.split,
        limit=args.limit,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _learn_templates(args: argparse.Namespace) -> int:
    from pedsynth.prototypes import learn_templates

    summary = learn_templates(args.source, args.out, n=args.n, seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from pedsynth.schemas.train import load_train_config

    # Validate before starting Prefect, so a typo costs a second, not a server start.
    cfg = load_train_config(args.config, data=args.data, out=args.out, overrides=args.set)
    from pedsynth.flows.train import train_retriever  # sets up Prefect's logging

    errors.start_log_file(cfg.out, "train", debug=args.debug)
    errors.quiet_prefect_tracebacks(debug=args.debug)
    result = train_retriever(config=args.config, data=args.data, out=args.out, overrides=args.set)
    shown = {k: result[k] for k in ("checkpoint", "val", "test") if k in result}
    print(json.dumps(shown, indent=2))
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from pedsynth.train.ablation import run_ablation

    table = run_ablation(
        args.benchmark,
        out=args.out,
        config=args.config,
        corrupt=args.corrupt,
        overrides=args.set,
        variants=args.variant,
        seeds=[int(x) for x in args.seeds.split(",") if x.strip()],
        steps=args.steps,
        min_test_identities=args.min_test_identities,
        filter_builds=_labelled(args.filter_build, "--filter-build") or None,
    )
    print(table)
    return 0


def _labelled(values: list[str], option: str) -> dict[str, str]:
    """``LABEL=VALUE`` options as a mapping; anything else is a one-line error."""
    pairs = {}
    for value in values:
        label, sep, target = value.partition("=")
        if not sep or not label or not target:
            raise PreflightError(f"{option} {value!r}: expected LABEL=PATH, e.g. attribute=OUT2")
        pairs[label] = target
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pedsynth", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample-data", help="generate the procedural pedestrian benchmark")
    p.add_argument("out")
    p.add_argument("--identities", type=int, default=200)
    p.add_argument("--images-per-identity", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--splits", default="0.8,0.1,0.1", help="train,val,test shares of the identities"
    )
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_sample_data)

    p = sub.add_parser("build", help="run the build-dataset flow locally")
    p.add_argument(
        "--config", default=None, help="a YAML run config, e.g. configs/offline-tiny.yaml"
    )
    p.add_argument(
        "--source",
        action="append",
        default=None,
        metavar="FORMAT:PATH",
        help=f"input dataset (repeatable); FORMAT is one of {', '.join(SOURCE_FORMATS)}",
    )
    p.add_argument("--out", default=None, help="output folder (overrides the config's `out`)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set shard_rows=500 (repeatable)",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks on the terminal")
    p.add_argument(
        "--wait", action="store_true", help="wait for another build of the same --out to finish"
    )
    p.set_defaults(func=_build)

    p = sub.add_parser("train", help="train and evaluate a retriever (train-retriever flow)")
    p.add_argument("--data", default=None, help="a pedsynth build folder, or FORMAT:PATH")
    p.add_argument("--config", default="configs/train-tiny.yaml", help="a YAML train config")
    p.add_argument("--out", default=None, help="run folder (overrides the config's `out`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on the terminal")
    p.set_defaults(func=_train)

    p = sub.add_parser("ablate", help="ablation rows over seeds on noisy captions")
    p.add_argument("benchmark", help="a procedural benchmark folder (see sample-data)")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--config", default="configs/train-tiny.yaml")
    p.add_argument("--corrupt", type=float, default=0.3, help="share of captions corrupted")
    p.add_argument("--variant", action="append", default=None, help="only these variants")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; mean ± std over them")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run (max_steps)")
    p.add_argument("--min-test-identities", type=int, default=100)
    p.add_argument(
        "--filter-build",
        action="append",
        default=[],
        metavar="LABEL=BUILD",
        help="a '+filter (LABEL)' row trained on that build (e.g. embedding=OUT1 attribute=OUT2)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_ablate)

    p = sub.add_parser("inspect", help="summarise a finished build from its manifest")
    p.add_argument("out")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("verify", help="re-read a finished build; exit 1 if anything is wrong")
    p.add_argument("out")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_verify)

    p = sub.add_parser("search", help="find images of a finished build by text (memory index)")
    p.add_argument("out")
    p.add_argument("text")
    p.add_argument("-k", type=int, default=10, help="how many images (default 10)")
    p.add_argument("--split", default=None, help="search one split only, e.g. test")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=_search)

    p = sub.add_parser("export", help="write a finished build in a public dataset's layout")
    p.add_argument("out", help="a finished pedsynth build")
    p.add_argument("dir", help="the export folder (empty, or an earlier run of the same export)")
    p.add_argument("--format", required=True, choices=["cuhk-pedes", "icfg-pedes", "rstpreid"])
    p.add_argument(
        "--caption-source",
        action="append",
        default=None,
        choices=["original", "mllm", "rewrite", "edit"],
        help="export only captions of this kind (repeatable; default: all)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an export already there")
    p.set_defaults(func=_export)

    p = sub.add_parser("export-ranking", help="RAR re-ranker training data from the memory index")
    p.add_argument("out", help="a finished pedsynth build with a memory")
    p.add_argument("dir", help="the export folder (empty, or an earlier run of the same export)")
    p.add_argument("--k", type=int, default=5, help="candidates per contact sheet (default 5)")
    p.add_argument("--split", default="train", help="which split's captions (default train)")
    p.add_argument("--limit", type=int, default=None, help="at most this many captions")
    p.add_argument("--seed", type=int, default=0, help="places true matches the index missed")
    p.add_argument("--overwrite", action="store_true", help="replace an export already there")
    p.set_defaults(func=_export_ranking)

    p = sub.add_parser(
        "learn-templates", help="learn caption style prototypes from a dataset's train captions"
    )
    p.add_argument("source", help="FORMAT:PATH of an annotated dataset, e.g. cuhk-pedes:data/CUHK")
    p.add_argument("out", help="the template file to write (YAML, templates.yaml's format)")
    p.add_argument("--n", type=int, default=1000, help="prototypes (clusters; default 1000)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    p.set_defaults(func=_learn_templates)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The first start of the embedded server migrates its database; on a busy machine that
    # takes longer than Prefect's default wait.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    args = build_parser().parse_args(argv)
    install_log_redaction()
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `pedsynth inspect OUT | head`: the reader left, fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        return errors.report(exc)


if __name__ == "__main__":
    raise SystemExit(main())
