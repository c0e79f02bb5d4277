"""`pathray embed` on Ray Data: embeddings equal to the model's own on the same tiles, rows equal to the
tissue grid, resume that leaves finished files untouched, bad slides reported while the others are
written, and the command end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.ray

MODEL = "vit_tiny_patch16_224"
KWARGS = {"depth": 1}
TILE, MPP = 32, 2.0  # 256 level-0 px of a 0.25 µm/px synthetic slide


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, testdata) -> pd.DataFrame:
    """Two small synthetic slides, a corrupt one and one that does not exist."""
    from pathray.wsi.synth import SynthConfig, write_synthetic_slides

    out = tmp_path_factory.mktemp("embed")
    written = write_synthetic_slides(out / "slides", n=2, seed=7, config=SynthConfig(size=2048))
    rows = [{"slide_id": s.slide_id, "uri": str(s.path)} for s in written]
    rows.append({"slide_id": "broken", "uri": str(testdata / "broken" / "broken.svs")})
    rows.append({"slide_id": "missing", "uri": str(out / "slides" / "nowhere.svs")})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def first_run(ray_local, cohort, s3_storage, object_store):
    from pathray.serving.embed import embed_slides

    out = f"s3://{object_store.bucket}/embed-test/first"
    seen: list[tuple[int, int]] = []
    report = embed_slides(
        cohort,
        MODEL,
        out,
        storage=s3_storage,
        tile_size=TILE,
        mpp=MPP,
        model_kwargs=KWARGS,
        batch_size=8,
        readers=1,
        progress=lambda done, total: seen.append((done, total)),
    )
    return report, out, seen


def test_bad_slides_are_reported_by_name_and_the_others_written(first_run, cohort):
    report, _, seen = first_run
    status = dict(zip(report.slides["slide_id"], report.slides["status"], strict=True))
    good = list(cohort["slide_id"][:2])
    assert status == {good[0]: "written", good[1]: "written", "broken": "failed", "missing": "failed"}
    reasons = dict(zip(report.slides["slide_id"], report.slides["reason"], strict=True))
    assert "broken.svs" in reasons["broken"] and "nowhere.svs" in reasons["missing"]
    assert report.tiles > 20 and seen[-1][0] == report.tiles == seen[-1][1]
    summary = report.summary()
    assert "2 written" in summary and "2 failed" in summary and "tiles/s" in summary
    assert 0.0 <= report.model_wait_share <= 1.0 and report.model_s > 0


def test_rows_are_the_tissue_grid_and_embeddings_the_models_own(first_run, cohort, s3_storage):
    from pathray.inference.embedder import load_embedder
    from pathray.inference.embeddings import read_slide_embeddings, slide_embeddings_uri
    from pathray.serving.embed import plan_slide_tiles
    from pathray.storage import StorageConfig
    from pathray.wsi.backends.open import open_slide
    from pathray.wsi.patching.tissue import TissueConfig

    report, out, _ = first_run
    embedder = load_embedder(MODEL, device="cpu", tile_size=TILE, mpp=MPP, model_kwargs=KWARGS)
    for slide_id, uri in zip(cohort["slide_id"][:2], cohort["uri"][:2], strict=True):
        table = read_slide_embeddings(slide_embeddings_uri(out, slide_id), s3_storage)
        assert table.source == embedder.source and table.source.random_init
        grid = plan_slide_tiles(slide_id, uri, None, TILE, MPP, 0.0, 0.05, StorageConfig(), TissueConfig())
        assert not grid["error"][0] and len(grid["x"]) == len(table) > 5
        np.testing.assert_array_equal(table.x, grid["x"])
        np.testing.assert_array_equal(table.y, grid["y"])
        np.testing.assert_allclose(table.tissue, grid["tissue"])
        assert (table.tissue >= 0.05).all() and (table.mpp == MPP).all() and (table.size == TILE).all()
        tiles = np.stack(open_slide(uri).read_batch(list(zip(table.x, table.y, strict=True)), TILE, MPP))
        expected = embedder.embed(tiles)
        assert table.embeddings.dtype == np.float16 and table.embeddings.shape == expected.shape
        got = table.embeddings.astype(np.float32)
        np.testing.assert_allclose(got, expected.astype(np.float32), atol=2e-2)


def test_a_second_run_skips_every_done_slide_and_touches_no_file(first_run, cohort, s3_storage):
    from pathray.inference.embeddings import slide_embeddings_uri
    from pathray.serving.embed import embed_slides
    from pathray.storage import parse_uri, read_bytes, stat

    report, out, _ = first_run
    done = report.slides.loc[report.slides["status"] == "written", "slide_id"].tolist()
    uris = [slide_embeddings_uri(out, s) for s in done]

    def state() -> list[tuple[str, bytes]]:
        return [(str(stat(parse_uri(u), s3_storage).get("ETag")), read_bytes(u, s3_storage)) for u in uris]

    before = state()
    again = embed_slides(
        cohort.iloc[:2], MODEL, out, storage=s3_storage, tile_size=TILE, mpp=MPP, model_kwargs=KWARGS
    )
    assert list(again.slides["status"]) == ["skipped", "skipped"] and again.seconds == 0
    assert state() == before


def test_tiles_decoded_where_the_model_runs_give_the_same_file(first_run, cohort, s3_storage, tmp_path):
    """``decode="device"`` (what a GPU actor does with nvJPEG, here on the CPU): no reader actors, the
    model actor fetches the compressed tiles and decodes them itself; the rows are the same and the
    embeddings equal the reader actors' within float16 rounding (the same JPEG decoder)."""
    from pathray.inference.embeddings import read_slide_embeddings, slide_embeddings_uri
    from pathray.serving.embed import embed_slides

    _, out, _ = first_run
    here = embed_slides(
        cohort.iloc[:2], MODEL, str(tmp_path), tile_size=TILE, mpp=MPP, model_kwargs=KWARGS, decode="device"
    )
    assert here.extra["decode"] == "device" and list(here.slides["status"]) == ["written", "written"]
    for slide_id in cohort["slide_id"][:2]:
        a = read_slide_embeddings(slide_embeddings_uri(out, slide_id), s3_storage)
        b = read_slide_embeddings(slide_embeddings_uri(str(tmp_path), slide_id))
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_allclose(
            a.embeddings.astype(np.float32), b.embeddings.astype(np.float32), atol=2e-2
        )
    with pytest.raises(ValueError, match="decode must be"):
        embed_slides(cohort.iloc[:1], MODEL, str(tmp_path / "x"), model_kwargs=KWARGS, decode="gpu")


def test_another_models_folder_is_refused(first_run, cohort, s3_storage):
    from pathray.inference.embeddings import EmbeddingFileError
    from pathray.serving.embed import embed_slides

    _, out, _ = first_run
    with pytest.raises(EmbeddingFileError, match="another --out"):
        embed_slides(cohort.iloc[:1], MODEL, out, storage=s3_storage, tile_size=TILE, mpp=MPP)


def test_embed_command_end_to_end_with_a_random_timm_model(ray_local, cohort, tmp_path):
    from typer.testing import CliRunner

    from pathray.cli import app

    manifest = tmp_path / "slides.csv"
    cohort.iloc[[0, 2]].to_csv(manifest, index=False)
    out = tmp_path / "emb"
    args = ["embed", str(manifest), "--model", MODEL, "--out", str(out), "--tile", str(TILE)]
    args += ["--mpp", str(MPP), "--batch", "8", "--model-kwarg", "depth=1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output  # one slide failed: the run went on, the exit says so
    output = result.output
    assert "RANDOM" in output and "broken" in output and "1 written" in output and "tiles/s" in output
    assert "waited for tiles" in output
    written = out / f"{cohort['slide_id'][0]}.parquet"
    mtime = written.stat().st_mtime_ns
    again = ["embed", str(cohort["uri"][0]), *args[2:]]  # one slide by its URI: its id is the file's stem
    result = CliRunner().invoke(app, again)
    assert result.exit_code == 0 and "1 skipped" in result.output and written.stat().st_mtime_ns == mtime


def test_cpu_shares_leave_room_for_the_grid():
    from pathray.serving.embed import cpu_shares

    assert cpu_shares(2, 1, 1.0, None) == (1, 0.5, 0.5)  # a laptop: everything fits beside one planner
    assert cpu_shares(4, 1, 1.0, None) == (2, 1.0, 1.0)
    assert cpu_shares(16, 1, 1.0, None) == (14, 1.0, 1.0)
    readers, each, model = cpu_shares(4, 1, 1.0, 8)
    assert readers == 8 and 8 * each + model + 1 <= 4
    with pytest.raises(ValueError, match="at least 2"):
        cpu_shares(1, 1, 1.0, None)


def test_undecodable_tiles_are_left_out_and_counted(ray_local, cohort, tmp_path):
    import shutil

    from tiffslide import TiffSlide

    from pathray.inference.embeddings import read_slide_embeddings, slide_embeddings_uri
    from pathray.serving.embed import embed_slides, plan_slide_tiles
    from pathray.storage import StorageConfig
    from pathray.wsi.patching.tissue import TissueConfig

    path = tmp_path / "damaged.svs"
    shutil.copy(cohort["uri"][0], path)
    page = TiffSlide(path).ts_tifffile.series[0].levels[1].keyframe  # 0.5 µm/px: read as it is
    with open(path, "r+b") as fh:
        for i in (5, 6):
            fh.seek(page.dataoffsets[i])
            fh.write(b"\x00" * 64)
    report = embed_slides(
        [str(path)],
        MODEL,
        str(tmp_path / "out"),
        tile_size=TILE,
        mpp=0.5,
        model_kwargs=KWARGS,
        batch_size=64,
        readers=1,
        max_failed_share=0.5,
    )
    (row,) = report.slides.itertuples()
    grid = plan_slide_tiles("damaged", str(path), None, TILE, 0.5, 0.0, 0.05, StorageConfig(), TissueConfig())
    assert row.status == "written" and row.tiles_failed > 0
    assert row.tiles + row.tiles_failed == grid["n_tiles"][0]
    table = read_slide_embeddings(slide_embeddings_uri(str(tmp_path / "out"), "damaged"))
    assert len(table) == row.tiles
    planned = set(zip(grid["x"].tolist(), grid["y"].tolist(), strict=True))
    assert set(zip(table.x.tolist(), table.y.tolist(), strict=True)) < planned
