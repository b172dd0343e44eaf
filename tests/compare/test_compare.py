"""`wan-nabla compare`, `generate --save-masks` and the GPU table's quick mode, on the tiny model.

Sizes: 144x208 px, 9 frames (patch grid 3x9x13, padded to 2x2 tiles per frame: pad keys in every
edge tile), the size test_cli.py compiles too, so the suite compiles FlexAttention for it once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch

from tests.support.reference import masked_attention_f64, nabla_keep, sta_keep, tile_ids, tile_order
from wan_nabla.attention import masks
from wan_nabla.attention.layout import TileLayout
from wan_nabla.cli import main
from wan_nabla.compare.probe import coarse_kept_mass, exact_attention_stats, frame_major, plan_block_keep, sample_rows
from wan_nabla.config import AttentionConfig

TINY = ["--model", "tiny", "--size", "144x208", "--frames", "9", "--steps", "2", "--quiet"]
STRIP = 18  # label strip above the side-by-side panels: round(144 * 0.12 / 2) * 2


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_exact_stats_match_float64_brute_force():
    """Guards the probe's arithmetic: chunked, row-subsampled exact attention with pad keys
    excluded, the relative L2 of an output against it, and the kept mass of 128x64 blocks (the
    CUDA geometry over time-paired tiles) equal a dense float64 computation from token masks."""
    g = torch.Generator().manual_seed(1)
    layout = TileLayout(3, 9, 13, time_pairs=True)
    b, h, d, s = 2, 3, 16, layout.padded_len
    q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    plan = masks.plan_blocks(AttentionConfig(type="nabla", threshold=0.5), q, k, layout, (128, 64))
    keep = plan_block_keep(plan)
    tile_keep = masks.tile_keep_mask(AttentionConfig(type="nabla", threshold=0.5), q, k, layout)
    assert torch.equal(keep, masks.coarsen(tile_keep, 2, 1))  # the plan's lists read back
    slots = torch.arange(plan.kv_idx.shape[-1])
    junk = dataclasses.replace(  # what follows the kept entries of a row must not matter
        plan,
        kv_idx=torch.where(slots < plan.kv_num[..., None], plan.kv_idx, 0),
        full_idx=torch.where(slots < plan.full_num[..., None], plan.full_idx, 0),
    )
    assert torch.equal(plan_block_keep(junk), keep)
    assert 0 < keep.float().mean() < 1

    token_keep = keep.repeat_interleave(128, 2)[:, :, :s].repeat_interleave(64, 3)[..., :s]
    valid = layout.valid()
    exact = masked_attention_f64(q, k, v, valid.expand(b, h, s, s))
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    p = torch.softmax(logits.masked_fill(~valid, -math.inf), -1)
    out = exact.float() + 0.01 * torch.randn(b, h, s, d, generator=g)
    rows = layout.real_token_index()[::3]
    stats = exact_attention_stats(
        q, k, v, {"o": out}, key_valid=valid, block_keep=keep, block_size=(128, 64), rows=rows, chunk_bytes=50_000
    )  # several chunks
    diff, ref = (out.double() - exact)[:, :, rows], exact[:, :, rows]
    assert stats["rel_l2"]["o"] == pytest.approx(float(diff.norm() / ref.norm()), rel=1e-9)
    per_head = (diff.square().sum((0, 2, 3)) / ref.square().sum((0, 2, 3))).sqrt()
    assert stats["rel_l2_per_head"]["o"] == pytest.approx(per_head.tolist(), rel=1e-9)
    kept = (p * token_keep)[:, :, rows].sum(-1)
    assert stats["kept_mass_min"] == pytest.approx(kept.amin((0, 2)).tolist(), rel=1e-9)
    assert stats["kept_mass_mean"] == pytest.approx(kept.mean((0, 2)).tolist(), rel=1e-9)
    assert stats["rows"] == len(rows) and max(stats["kept_mass_mean"]) < 1


def test_coarse_kept_mass_matches_brute_force_and_meets_threshold():
    """Guards the coarse kept mass: it equals the mass of the brute-force NABLA keep set on a
    float64 pooled map (tests/support/reference.py, raster tokens of a padded grid), is >= threshold on
    every query tile (the CDF rule) and below 1 (tiles were dropped)."""
    g = torch.Generator().manual_seed(2)
    grid, th = (3, 9, 13), 0.4
    layout = TileLayout(*grid)
    q_r, k_r = (torch.randn(2, 2, 3 * 9 * 13, 16, generator=g) for _ in range(2))
    q, k = layout.to_tiles(q_r, seq_dim=2), layout.to_tiles(k_r, seq_dim=2)
    keep = masks.tile_keep_mask(AttentionConfig(type="nabla", threshold=th), q, k, layout)
    got = coarse_kept_mass(q, k, layout, keep)
    ref_keep, margin = nabla_keep(q_r, k_r, grid, th)
    assert margin > 1e-6 and torch.equal(keep, ref_keep)
    ids = tile_ids(*grid)
    pool = torch.zeros(len(ids), int(ids.max()) + 1, dtype=torch.float64).index_put_(
        (torch.arange(len(ids)), ids), torch.ones(len(ids), dtype=torch.float64)
    )
    pool /= pool.sum(0)
    qp, kp = (torch.einsum("bhsd,sn->bhnd", x.double(), pool) for x in (q_r, k_r))
    p = torch.softmax(qp @ kp.transpose(-1, -2) / 4.0, -1)
    mass = (p * ref_keep).sum(-1)
    assert got["min"] == pytest.approx(mass.amin((0, 2)).tolist(), abs=1e-6)
    assert got["mean"] == pytest.approx(mass.mean((0, 2)).tolist(), abs=1e-6)
    assert min(got["min"]) >= th - 1e-6 and max(got["mean"]) < 1


def test_sample_rows_and_frame_major_order():
    """Guards: row subsampling keeps only real tokens, evenly spread; pictures' frame-major order
    undoes the time-paired tile order (an STA mask reordered equals the brute-force rule in
    (t, i, j) order, so frame boundaries drawn at multiples of tiles-per-frame are right)."""
    layout = TileLayout(5, 9, 13, time_pairs=True)
    real = layout.real_token_index()
    rows = sample_rows(layout.padded_len, 100, torch.device("cpu"), real)
    assert len(rows) == 100 and bool(layout.valid()[rows].all()) and rows[0] == real[0] and rows[-1] == real[-1]
    assert tile_order(5, 9, 13, True) != tile_order(5, 9, 13, False)  # the orders really differ here
    order = frame_major(layout)
    sta = masks.sta_tile_mask(layout, (3, 1, 1), "cpu")
    assert torch.equal(sta[order][:, order], sta_keep(5, 9, 13, (3, 1, 1)))


def _read(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def _ssim_reference(a, b, win: int = 7) -> float:
    """SSIM from its definition in float64: uniform win x win window over every valid position,
    sample covariance, C1 = 0.01^2, C2 = 0.03^2 (data range 1), averaged over channels."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    n = win * win
    vals = []
    for fa, fb in zip(a.astype(np.float64), b.astype(np.float64), strict=False):
        per_channel = []
        for c in range(fa.shape[-1]):
            pa = sliding_window_view(fa[..., c], (win, win))
            pb = sliding_window_view(fb[..., c], (win, win))
            ua, ub = pa.mean((-1, -2)), pb.mean((-1, -2))
            va = ((pa - ua[..., None, None]) ** 2).sum((-1, -2)) / (n - 1)
            vb = ((pb - ub[..., None, None]) ** 2).sum((-1, -2)) / (n - 1)
            vab = ((pa - ua[..., None, None]) * (pb - ub[..., None, None])).sum((-1, -2)) / (n - 1)
            c1, c2 = 0.01**2, 0.03**2
            per_channel.append((((2 * ua * ub + c1) * (2 * vab + c2)) / ((ua**2 + ub**2 + c1) * (va + vb + c2))).mean())
        vals.append(np.mean(per_channel))
    return vals


def test_frame_metrics_match_their_definitions():
    """Guards the one PSNR/SSIM of the product (compare and the levers benchmark both read it):
    per-frame SSIM equals the windowed definition, PSNR = 10 log10(1 / MSE) per frame and over
    the video, identical frames give SSIM 1 and PSNR "inf"."""
    import numpy as np

    from wan_nabla.compare.metrics import frame_metrics

    g = np.random.default_rng(0)
    a = g.random((3, 23, 31, 3))
    b = np.clip(a + 0.1 * g.standard_normal(a.shape), 0, 1)
    m = frame_metrics(a, b)
    assert m["ssim"] == pytest.approx(_ssim_reference(a, b), abs=1e-9)
    mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
    assert m["psnr_db"] == pytest.approx(list(10 * np.log10(1 / mse)), rel=1e-12)
    assert m["overall"]["psnr_db"] == pytest.approx(10 * np.log10(1 / mse.mean()), rel=1e-12)
    assert m["overall"]["ssim_mean"] == pytest.approx(np.mean(m["ssim"])) and m["overall"]["ssim_min"] == min(m["ssim"])
    same = frame_metrics(a, a)
    assert same["overall"]["psnr_db"] == "inf" and same["ssim"] == pytest.approx([1.0] * 3, abs=1e-12)


def test_ssim_torch_matches_scikit_image():
    """Guards the torch SSIM the GPU benchmarks (levers, decode) use instead of scikit-image's for
    time: per frame it equals structural_similarity(channel_axis=-1, data_range=1) within 1e-6 on
    awkward sizes, frames split across chunks, near-identical and unrelated frames, float32 input;
    frame_metrics(ssim_device=...) carries it; too small a frame is refused."""
    import numpy as np
    from skimage.metrics import structural_similarity

    from wan_nabla.compare.metrics import frame_metrics, ssim_torch

    g = np.random.default_rng(7)
    for shape, noise in (((5, 23, 31, 3), 0.05), ((3, 7, 40, 3), 0.5), ((2, 17, 9, 1), 0.01)):
        a = g.random(shape).astype(np.float32)
        b = np.clip(a + noise * g.standard_normal(shape), 0, 1).astype(np.float32)
        ref = [
            structural_similarity(x.astype(np.float64), y.astype(np.float64), channel_axis=-1, data_range=1.0)
            for x, y in zip(a, b, strict=False)
        ]
        got = ssim_torch(a, b, "cpu", frames_per_chunk=2)
        assert got == pytest.approx(ref, abs=1e-6)
        assert len(set(np.round(ref, 6))) == len(ref)  # frames differ, so a frame mix-up would fail
    a = g.random((4, 19, 21, 3))
    b = np.clip(a + 0.2 * g.standard_normal(a.shape), 0, 1)
    m_sk, m_t = frame_metrics(a, b), frame_metrics(a, b, ssim_device="cpu")
    assert m_t["ssim"] == pytest.approx(m_sk["ssim"], abs=1e-6)
    assert m_t["overall"]["ssim_mean"] == pytest.approx(m_sk["overall"]["ssim_mean"], abs=1e-6)
    with pytest.raises(ValueError, match="H, W >= 7"):
        ssim_torch(a[:, :6], b[:, :6])


def test_compare_config_with_itself_is_identical(tmp_path):
    """Guards: both runs share seed, initial noise and settings: a config against itself gives
    identical videos (PSNR inf, SSIM 1, zero latent and per-step output differences), while the
    candidate's attention error against exact attention is still measured (sparse, so > 0). Also
    every output file and the pictures' pixel sizes."""
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--prompt",
                "a fox",
                "--config",
                "nabla_0.4",
                "--against",
                "nabla_0.4",
                "--out",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    m = _read(out, "metrics.json")
    assert m["frames"]["overall"]["psnr_db"] == "inf" and m["frames"]["psnr_db"] == ["inf"] * 9
    assert m["frames"]["ssim"] == [pytest.approx(1.0, abs=1e-12)] * 9
    assert m["latents"]["final_rel_l2"] == 0.0 and m["steps"]["output_rel_l2"] == [0.0, 0.0]
    assert m["reference"]["label"] == m["candidate"]["label"] == "nabla 0.4"
    assert m["timings"]["speedup"] > 0 and len(m["density"]["layer_step"]) == 2
    a = _read(out, "attention_error.json")
    assert len(a["calls"]) == 4 and a["summary"]["rel_l2_mean"] > 1e-2  # steps 0,1 x layers 0,1
    names = {p.name for p in (out / "masks").iterdir()}
    assert names == {"density.png"} | {f"step{s:03d}_layer{layer:02d}.png" for s in (0, 1) for layer in (0, 1)}
    assert png_size(out / "masks" / "step000_layer00.png") == (840, 420)  # 2 heads: (3.6 * 2 + 1.2) x 4.2 in
    assert png_size(out / "masks" / "density.png") == (640, 480)
    assert png_size(out / "metrics.png") == (1350, 440)
    assert png_size(out / "side_by_side.png") == (3 * 144, 208 + STRIP)
    from wan_nabla.output.video import probe_mp4

    info = probe_mp4(out / "side_by_side.mp4")
    assert (info["frames"], info["width"], info["height"]) == (9, 3 * 144, 208 + STRIP)
    report = (out / "report.md").read_text()
    for link in (
        "metrics.png",
        "side_by_side.png",
        "side_by_side.mp4",
        "masks/density.png",
        "masks/step001_layer01.png",
    ):
        assert f"({link})" in report and (out / link).exists()
    assert "random weights" in report
    assert not [p for p in out.rglob(".*")]  # no temp files left


def test_compare_sparse_against_full(tmp_path):
    """Guards: a sparse candidate against full attention: finite PSNR, non-zero differences, an
    attention error well above the dense kernel's rounding floor, token-level kept mass below 1,
    and NABLA's guarantee on its coarse map: every query tile keeps >= threshold of the mass."""
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--prompt",
                "a fox",
                "--config",
                "nabla_0.4",
                "--out",
                str(out),
                "--no-video",
                "--sample-steps",
                "-1",
                "--sample-layers",
                "0,1",
                *TINY,
            ]
        )
        == 0
    )
    assert not (out / "side_by_side.mp4").exists() and (out / "side_by_side.png").exists()
    m = _read(out, "metrics.json")
    psnr = m["frames"]["overall"]["psnr_db"]
    assert isinstance(psnr, float) and math.isfinite(psnr) and m["frames"]["overall"]["ssim_mean"] < 1
    assert m["latents"]["final_rel_l2"] > 0 and all(x > 0 for x in m["steps"]["output_rel_l2"])
    assert m["reference"]["label"] == "full" and m["reference_density"] == 1.0
    assert 0 < m["density"]["overall"] < 1
    a = _read(out, "attention_error.json")
    assert [(c["step"], c["layer"]) for c in a["calls"]] == [(1, 0), (1, 1)]
    for c in a["calls"]:
        e = c["exact"]
        assert e["rel_l2"]["sparse"] > 10 * e["rel_l2"]["dense_kernel"] > 0
        assert max(e["kept_mass_mean"]) < 1 and min(e["kept_mass_min"]) < 0.5
        assert min(c["coarse_mass_min"]) >= 0.4 - 1e-6  # the CDF rule on the coarse map
        assert 0 < c["density"] < 1 and e["rows"] == e["rows_of"] == 3 * 9 * 13
    assert "threshold 0.4" in (out / "report.md").read_text()


def test_generate_save_masks(tmp_path):
    """Guards: `generate --save-masks` draws the sampled masks of that very run next to the MP4
    (sampling flags honoured, negative indices from the end) and still writes MP4 + sidecar."""
    video = tmp_path / "fox.mp4"
    assert (
        main(
            [
                "generate",
                "--prompt",
                "a fox",
                "--config",
                "nabla_0.4",
                "--output",
                str(video),
                "--save-masks",
                "--sample-steps",
                "-1",
                "--sample-layers",
                "1",
                "--sample-heads",
                "1",
                *TINY,
            ]
        )
        == 0
    )
    assert video.exists() and video.with_suffix(".json").exists()
    pictures = tmp_path / "fox_masks"
    assert sorted(p.name for p in pictures.iterdir()) == ["density.png", "step001_layer01.png"]
    assert png_size(pictures / "step001_layer01.png") == (480, 420)  # 1 head: (3.6 + 1.2) x 4.2 in


def _nonempty(t: Path) -> list[str]:
    (t / "cmp").mkdir()
    (t / "cmp" / "keep.txt").write_text("mine")
    return []


@pytest.mark.parametrize(
    "extra, needle",
    [
        (lambda t: ["--config", "nabla_0.77"], "nabla_0.77"),
        (lambda t: ["--config", "nabla_0.4", "--against", str(t / "nope.yaml")], "does not exist"),
        (lambda t: ["--frames", "8"], "--frames"),
        (lambda t: _nonempty(t), "not empty"),
        (lambda t: ["--sample-steps", "a,b"], "--sample-steps"),
        (lambda t: ["--sample-layers", "2"], "--sample-layers"),  # checked after the model is loaded
        (lambda t: ["--sample-steps", "5"], "--sample-steps"),
        (lambda t: ["--max-query-rows", "0"], "--max-query-rows"),
        (lambda t: ["--model", str(t / "no-such-model")], "hf download"),
    ],
)
def test_compare_bad_input_exit_2_nothing_written(tmp_path, capsys, extra, needle):
    """Guards: bad input exits 2 with one line naming it; the output directory the run would
    create is gone again (an existing one is left exactly as it was)."""
    args = ["compare", "--prompt", "x", "--out", str(tmp_path / "cmp"), *TINY]
    more = extra(tmp_path)
    if "--config" not in more:
        more += ["--config", "nabla_0.4"]
    existed = (tmp_path / "cmp").exists()
    assert main(args + more) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wan-nabla: error:") and needle in err[0], err
    if existed:
        assert [p.name for p in (tmp_path / "cmp").iterdir()] == ["keep.txt"]
    else:
        assert not (tmp_path / "cmp").exists()


def test_missing_extras_and_full_masks_exit_2(tmp_path, capsys, monkeypatch):
    """Guards: without scikit-image, compare says which extra to install (exit 2, nothing
    created); --save-masks refuses a full-attention config and a missing matplotlib."""
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage -> ImportError
    out = tmp_path / "deep" / "cmp"
    assert main(["compare", "--prompt", "x", "--config", "nabla_0.4", "--out", str(out), *TINY]) == 2
    assert "scikit-image" in capsys.readouterr().err and not (tmp_path / "deep").exists()
    video = tmp_path / "v.mp4"
    assert main(["generate", "--prompt", "x", "--config", "full", "--output", str(video), "--save-masks", *TINY]) == 2
    assert "full attention" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert (
        main(["generate", "--prompt", "x", "--config", "nabla_0.4", "--output", str(video), "--save-masks", *TINY]) == 2
    )
    assert "matplotlib" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_gpu_table_quick_mode(tmp_path, capsys, monkeypatch):
    """Guards the GPU script's logic (benchmarks/jobs/gpu_compare.sh runs this module at full size): one
    reference, a row per preset with attention error, kept mass and NABLA's coarse guarantee,
    JSON + markdown + pictures written, the table printed last; a preset that fails becomes an
    error row (exit 1) and does not cost the others' rows."""
    import benchmarks.harness.compare_table as table

    real = table.capture

    def capture(pipe, config, *a, **kw):
        if config.attention.threshold == 0.7:
            raise RuntimeError("kernel exploded")
        return real(pipe, config, *a, **kw)

    monkeypatch.setattr(table, "capture", capture)
    assert (
        table.main(["--out", str(tmp_path), "--quick", "--device", "cpu", "--presets", "nabla_0.7", "nabla_0.4"]) == 1
    )
    result = json.loads((tmp_path / "compare_table.json").read_text())
    assert result["settings"]["model"] == "tiny" and "Random weights" in result["note"]
    row, failed = result["rows"]  # presets run in the bundled (sorted) order
    assert failed == {"preset": "nabla_0.7", "label": "nabla 0.7", "error": "RuntimeError: kernel exploded"}
    assert row["preset"] == "nabla_0.4" and 0 < row["density"] < 1
    assert row["rel_l2_mean"] > 10 * row["dense_kernel_rel_l2_mean"] and row["kept_mass_mean"] < 1
    assert row["coarse_mass_min"] >= 0.4 - 1e-6 and row["attention_error"]["calls"]
    assert {p.name for p in tmp_path.iterdir()} == {
        "compare_table.json",
        "compare_table.md",
        "compare_table.png",
        "compare_mask_nabla_0.4.png",
    }
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert any(line.startswith("| nabla_0.4 |") for line in printed[-8:])
    assert any(line.startswith("| nabla_0.7 | RuntimeError") for line in printed[-8:])
    assert table.main(["--out", str(tmp_path), "--quick", "--presets", "full"]) == 2
