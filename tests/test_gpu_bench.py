"""``benchmarks/gpu.py``: the smoke run fills every row of the table, and its FLOP count agrees
with a hand count of a small ViT (the GPU numbers themselves need a GPU: ``--device cuda``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import gpu  # noqa: E402  (benchmarks/gpu.py)


def vit_flops_by_hand(
    height: int, width: int, *, patch: int, width_: int, layers: int, embed: int
) -> int:
    """2 FLOPs per multiply-add of an open_clip ViT image tower (MLP ratio 4, class token)."""
    patches = (height // patch) * (width // patch)
    tokens = patches + 1
    patch_embed = 2 * patches * (3 * patch * patch) * width_
    qkv = 2 * tokens * width_ * 3 * width_
    scores_and_mix = 2 * (2 * tokens * tokens * width_)  # q·kᵀ, then attention · v
    out_proj = 2 * tokens * width_ * width_
    mlp = 2 * (2 * tokens * width_ * 4 * width_)
    head = 2 * width_ * embed  # class token through visual.proj
    return patch_embed + layers * (qkv + scores_and_mix + out_proj + mlp) + head


@pytest.mark.parametrize("size", [(224, 224), (384, 128)])
def test_flop_count_matches_hand_count_of_tiny_vit(size):
    from pedsynth.engines.clip import build_engine
    from pedsynth.schemas.vision import ClipModelConfig

    engine = build_engine(
        ClipModelConfig(
            model="pedsynth-tiny-clip", pretrained="random", device="cpu", image_size=size
        )
    )
    # pedsynth-tiny-clip (engines/tiny_clip.py): 4 layers of width 64, 16-px patches, embed 64
    expected = vit_flops_by_hand(*size, patch=16, width_=64, layers=4, embed=64)
    assert gpu.clip_image_flops(engine.model, *size) == expected
    # the count must not depend on MultiheadAttention's fast path being on
    assert torch.backends.mha.get_fastpath_enabled()


def test_person_shape_cuts_to_the_patch_grid():
    assert gpu.person_shape(16) == (384, 128)
    assert gpu.person_shape(14) == (378, 126)
    assert gpu.architecture_patch("ViT-L-14") == 14


def test_peak_table_prefers_the_specific_name():
    assert gpu.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert gpu.bf16_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert gpu.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == pytest.approx(312.0)
    assert gpu.bf16_peak_tflops("NVIDIA L40S") == pytest.approx(362.1)
    assert gpu.bf16_peak_tflops("Some Future GPU") is None


def test_smoke_run_fills_every_row(tmp_path, monkeypatch):
    rows, skipped, device = gpu.run_suite(gpu.parse_args(["--device", "cpu", "--smoke"]))
    assert skipped == {}
    dims = gpu.SMOKE
    expected = (
        [("clip", name, shape) for name in dims.clip_models for shape in ("224×224", "384×128")]
        + [("caption", "tiny Qwen2-VL", "384×128")] * len(dims.caption_batches)
        + [("inpaint", "tiny-random:sd-inpaint", f"{h}×{w}") for h, w in dims.inpaint_sizes]
        + [("train", dims.train_model, "384×128")]
    )
    assert [(r.group, r.model, r.shape) for r in rows] == expected
    assert [r.batch for r in rows if r.group == "caption"] == list(dims.caption_batches)
    assert all(r.rate > 0 for r in rows)
    assert {r.unit for r in rows} == {"images/s", "captions/s", "edits/s", "steps/s"}
    assert all(r.flops_per_item for r in rows if r.group == "clip")

    body = gpu.render(rows, skipped, device, "python benchmarks/gpu.py --device cpu --smoke")
    table = [line for line in body.splitlines() if line.startswith("|")]
    columns = len(gpu.TABLE_COLUMNS)
    assert len(table) == 2 + len(rows)  # header, rule, one line per row
    assert all(line.count("|") - 1 == columns for line in table)
    assert "% bf16 peak" in table[0] and "device: cpu" in body

    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    monkeypatch.setattr(gpu, "write_section", _writer_to(target))
    monkeypatch.setattr(gpu, "run_suite", lambda args: (rows, skipped, device))
    gpu.main(["--device", "cpu", "--smoke", "--write"])
    text = target.read_text()
    assert "kept" in text
    section = text.split("<!-- gpu:start -->")[1].split("<!-- gpu:end -->")[0]
    assert section.count("\n| clip |") == len(dims.clip_models) * 2


def _writer_to(path: Path):
    from report import write_section

    return lambda name, body: write_section(name, body, path)


def test_check_names_what_is_missing(monkeypatch, capsys):
    real = gpu.importlib.util.find_spec
    monkeypatch.setattr(
        gpu.importlib.util, "find_spec", lambda m: None if m == "diffusers" else real(m)
    )
    assert gpu.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "inpaint: missing diffusers" in out and "clip: ready" in out
