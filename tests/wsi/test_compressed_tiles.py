"""Compressed tiles: the byte streams a GPU decoder would receive, decoded on CPU, equal today's reader.

Tolerances. JPEG streams decoded by another libjpeg-turbo build (PIL's) may differ by a level or
two, so decoded JPEG must agree within ``MAX_ABS`` per value and ``MEAN_ABS`` on average (measured
here: 0 and 0, imagecodecs and PIL alike). Regions resampled by torch instead of PIL: within
``RESAMPLE_MAX_ABS`` / ``RESAMPLE_MEAN_ABS`` (measured: max 1, mean 0.08-0.13). Codecs decoded by
the same imagecodecs call as the reader (JPEG 2000, LZW, deflate, zstd) must be exact. nvJPEG
upsamples chroma and rounds its IDCT its own way: ``GPU_MAX_ABS`` / ``MEAN_ABS`` (a stream decoded
with the wrong colour transform is off by ~40 on average, far outside).
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pathray.wsi import tiledecode
from pathray.wsi.backends.compressed import CompressedTileReader, compressed_tiles
from pathray.wsi.backends.errors import SlideReadError
from pathray.wsi.backends.open import open_slide
from pathray.wsi.backends.slide import FILL
from pathray.wsi.tiledecode import (
    ADOBE_RGB,
    TileCodec,
    TileLayout,
    decode_jpeg_cpu,
    decode_tile,
    decode_tiles,
    decode_tiles_cpu,
    standalone_jpeg,
)

MAX_ABS = 4
MEAN_ABS = 1.0
RESAMPLE_MAX_ABS = 2
RESAMPLE_MEAN_ABS = 0.25
GPU_MAX_ABS = 32
BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_decode.py"
SOI, EOI = b"\xff\xd8", b"\xff\xd9"


def pil_decode(stream: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(stream)) as img:
        return np.asarray(img.convert("RGB"))


def imagecodecs_decode(stream: bytes) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpeg8_decode(stream)


DECODERS = {"imagecodecs": imagecodecs_decode, "pil": pil_decode}


def paste(tiles, images, width: int, height: int) -> np.ndarray:
    """A whole level from its decoded tiles (HWC arrays), cropped to the level."""
    out = np.full((height, width, 3), 0, np.uint8)
    for tile, image in zip(tiles, images, strict=True):
        out[tile.y : tile.y + tile.height, tile.x : tile.x + tile.width] = image[: tile.height, : tile.width]
    return out


def assert_close(
    got: np.ndarray, want: np.ndarray, max_abs: int = MAX_ABS, mean_abs: float = MEAN_ABS
) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= max_abs and diff.mean() <= mean_abs, (int(diff.max()), float(diff.mean()))


def whole_level_matches(slide, level: int, decode) -> float:
    """Every tile of ``level`` decoded from its standalone stream, against read_region: the max diff."""
    reader = CompressedTileReader(slide)
    layout = reader.layout(level)
    tiles = reader.compressed_tiles(level, range(len(layout.offsets)))
    images = [decode(t.data) for t in tiles]
    got = paste(tiles, images, layout.width, layout.height)
    want = slide.read_region(0, 0, level, (layout.width, layout.height))
    assert_close(got, want)
    return float(np.abs(got.astype(np.int16) - want).max())


# -- (a) SVS: abbreviated JPEG with shared tables, RGB components ---------------------------------


@pytest.fixture(scope="module")
def cmu(testdata: Path):
    slide = open_slide(testdata / "aperio" / "CMU-1-Small-Region.svs", cache=False)
    yield slide
    slide.close()


def test_svs_tiles_become_standalone_jpeg_with_tables_and_adobe_rgb(cmu):
    layout = CompressedTileReader(cmu).layout(0)
    tables = layout.codec.jpegtables
    assert tables and tables[:2] == SOI and tables[-2:] == EOI, "CMU-1 stores shared JPEGTables"
    assert layout.codec.name == "jpeg" and layout.codec.rgb_jpeg  # Photometric RGB, no JFIF: Aperio
    with open(cmu.location.path, "rb") as fh:
        fh.seek(layout.offsets[7])
        stored = fh.read(layout.bytecounts[7])
    (tile,) = compressed_tiles(cmu, 0, [7])
    assert (tile.col, tile.row, tile.x, tile.y) == (7 % layout.across, 7 // layout.across, 7 * 240, 0)
    assert tile.data == SOI + ADOBE_RGB + tables[2:-2] + stored[2:]
    assert tile.data.count(SOI) == 1 and tile.data.endswith(EOI)
    assert standalone_jpeg(tile.data, None, rgb=True) == tile.data, "a marker already there is kept once"


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_svs_streams_decode_to_the_readers_pixels(cmu, decoder):
    assert whole_level_matches(cmu, 0, DECODERS[decoder]) == 0  # same libjpeg-turbo IDCT: exact


def test_without_the_adobe_marker_aperio_colours_are_wrong(cmu):
    """The reason for APP14: a decoder left to guess treats components 0, 1, 2 as YCbCr."""
    layout = CompressedTileReader(cmu).layout(0)
    (tile,) = compressed_tiles(cmu, 0, [40])
    guessed = imagecodecs_decode(standalone_jpeg(tile.data.replace(ADOBE_RGB, b""), None))
    right = decode_jpeg_cpu(tile.data)
    assert layout.codec.rgb_jpeg and np.abs(guessed.astype(int) - right).max() > 50


# -- (b) a generic pyramidal JPEG TIFF written by tifffile ------------------------------------------


@pytest.fixture(scope="module")
def cmu_pixels(testdata: Path) -> np.ndarray:
    return tifffile.imread(testdata / "aperio" / "CMU-1-Small-Region.svs", key=0)[:1200, :1500]


def write_pyramid(path: Path, image: np.ndarray, **kwargs) -> Path:
    """A tiled pyramid (level 0 + 2 SubIFD levels, halving) the way tifffile writes generic TIFFs."""
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(256, 256), subifds=2, photometric="rgb", **kwargs)
        for d in (2, 4):
            tif.write(image[::d, ::d], tile=(256, 256), subfiletype=1, photometric="rgb", **kwargs)
    return path


@pytest.fixture(scope="module")
def jpeg_tiff(tmp_path_factory, cmu_pixels) -> Path:
    return write_pyramid(tmp_path_factory.mktemp("jpegtiff") / "generic.tiff", cmu_pixels, compression="jpeg")


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_generic_jpeg_tiff_streams_decode_to_the_readers_pixels(jpeg_tiff, decoder):
    slide = open_slide(jpeg_tiff, cache=False)
    assert slide.level_count == 3
    reader = CompressedTileReader(slide)
    for level in range(3):
        codec = reader.layout(level).codec
        # tifffile writes complete YCbCr JFIF tiles: nothing to splice, no Adobe marker
        assert codec.name == "jpeg" and codec.photometric == 6 and codec.jpegtables is None
        (tile,) = reader.compressed_tiles(level, [0])
        assert ADOBE_RGB not in tile.data
        assert whole_level_matches(slide, level, DECODERS[decoder]) <= MAX_ABS


# -- (c) codecs without a GPU decoder: decoded on CPU by the reader's own codec ------------------


@pytest.fixture(scope="module", params=["lzw", "deflate", "zstd"])
def fallback_tiff(request, tmp_path_factory, cmu_pixels) -> Path:
    path = tmp_path_factory.mktemp("fallback") / f"{request.param}.tiff"
    return write_pyramid(path, cmu_pixels[:700, :900], compression=request.param, predictor=True)


def exact_everywhere(slide, codec: str, box: tuple[int, int] = (1100, 900)) -> None:
    """Each level's top-left ``box`` (all of a small level) from raw tiles equals read_region exactly."""
    reader = CompressedTileReader(slide)
    for level in range(slide.level_count):
        layout = reader.layout(level)
        assert layout.codec.name == codec
        w, h = min(box[0], layout.width), min(box[1], layout.height)
        tiles = reader.compressed_tiles(level, layout.indices_for(0, 0, w, h))
        assert not any(t.gpu_decodable for t in tiles)
        got = paste(tiles, [decode_tile(t) for t in tiles], layout.width, layout.height)[:h, :w]
        assert np.array_equal(got, slide.read_region(0, 0, level, (w, h)))


def test_synthetic_fallback_codecs_are_exact(fallback_tiff):
    exact_everywhere(open_slide(fallback_tiff, cache=False), fallback_tiff.stem)


@pytest.mark.parametrize(
    ("name", "codec"),
    [
        ("aperio/tcga-cr-7395-01a-01-ts1.svs", "jpeg2000"),  # Aperio 33005
        ("generic-tiff/boxes.tiff", "deflate"),  # with a horizontal predictor
        ("generic-tiff/yb10kx5k.zstd.tiff", "zstd"),
        ("generic-tiff/small_la.tiff", "tiff-jpeg"),  # grey + alpha JPEG: not for nvJPEG
    ],
)
def test_real_fallback_slides_are_exact(testdata, name, codec):
    exact_everywhere(open_slide(testdata / name, cache=False), codec)


# -- regions: several tiles, cropped and resampled, as read_region / read_batch ------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from pathray.wsi.synth import SynthConfig, write_synthetic_slide

    path = tmp_path_factory.mktemp("synth") / "compressed.svs"
    write_synthetic_slide(path, seed=3, config=SynthConfig(size=2048, tile=256))
    return path


def test_region_from_several_tiles_equals_read_region(synthetic):
    slide = open_slide(synthetic, cache=False)
    reader = CompressedTileReader(slide)
    for level, (x, y, size) in enumerate([(300, 200, (500, 300)), (900, 610, 333), (1900, 1500, 200)]):
        got = reader.read_region(x, y, level, size).permute(1, 2, 0).numpy()
        assert_close(got, slide.read_region(x, y, level, size))
    # a region over the edge: glass outside, as the reader pads it
    got = reader.read_region(1900, 1950, 0, 256).permute(1, 2, 0).numpy()
    assert (got[-50:] == FILL).all()
    assert_close(got, slide.read_region(1900, 1950, 0, 256))


@pytest.mark.parametrize("mpp", [0.5, 0.7, 0.2])  # a level as is, shrunk from the finer one, enlarged
def test_read_batch_equals_the_readers(synthetic, mpp):
    slide = open_slide(synthetic, cache=False)
    reader = CompressedTileReader.for_slide(slide)
    coords = [(37 + 211 * i, 1700 - 173 * i) for i in range(8)] + [(1950, 1950)]
    got = reader.read_batch(coords, 224, mpp)
    assert tuple(got.shape) == (len(coords), 3, 224, 224)
    want = slide.read_batch(coords, 224, mpp)
    for g, w in zip(got.permute(0, 2, 3, 1).numpy(), want, strict=True):
        assert_close(g, w, RESAMPLE_MAX_ABS, RESAMPLE_MEAN_ABS)


def test_svs_read_batch_resampled_equals_the_readers(cmu):
    coords = [(100, 150), (1000, 1400), (2000, 2700)]
    got = CompressedTileReader(cmu).read_batch(coords, (180, 120), 0.6).permute(0, 2, 3, 1).numpy()
    for g, w in zip(got, cmu.read_batch(coords, (180, 120), 0.6), strict=True):
        assert_close(g, w, RESAMPLE_MAX_ABS, RESAMPLE_MEAN_ABS)


def test_levels_without_raw_tiles_are_read_by_the_slide(testdata):
    slide = open_slide(testdata / "plain-tiff" / "kidney-48-5.tif", mpp=0.5, cache=False)  # stripped
    reader = CompressedTileReader(slide)
    assert not reader.servable(0)
    with pytest.raises(SlideReadError, match="level 0 cannot be read as raw tiles"):
        reader.compressed_tiles(0, [0])
    coords = [(10, 20), (600, 300)]
    got = reader.read_batch(coords, 128, 0.5).permute(0, 2, 3, 1).numpy()
    assert all(np.array_equal(g, w) for g, w in zip(got, slide.read_batch(coords, 128, 0.5), strict=True))


def packed_equal_read_batch(
    reader, coords, size, mpp, max_abs: int = 0, mean_abs: float = 0.0
) -> list[bytes]:
    blobs = reader.packed_regions(coords, size, mpp)
    got = tiledecode.decode_regions(blobs).permute(0, 2, 3, 1).numpy()
    want = reader.read_batch(coords, size, mpp).permute(0, 2, 3, 1).numpy()
    assert got.shape == want.shape
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, max_abs, mean_abs)
    return blobs


@pytest.mark.parametrize("mpp", [0.5, 0.2])
def test_packed_regions_decode_to_read_batch(synthetic, cmu, jpeg_tiff, mpp):
    """What a reader hands a GPU worker (tiles as stored, box, size) decodes to ``read_batch``'s pixels."""
    coords = [(37 + 211 * i, 1700 - 173 * i) for i in range(6)] + [(1950, 1950)]
    for slide in (open_slide(synthetic, cache=False), cmu, open_slide(jpeg_tiff, mpp=0.25, cache=False)):
        reader = CompressedTileReader.for_slide(slide)
        blobs = packed_equal_read_batch(reader, coords, 224, mpp)
        tiles = [t for b in blobs for t in tiledecode.unpack_region(b).tiles]
        assert tiles and all(t.gpu_decodable for t in tiles)  # standalone JPEG streams, tables spliced in
        # the bytes are the tiles as stored (made standalone): a few KB, not the pixels
        assert sum(len(b) for b in blobs) < 0.25 * len(coords) * 224 * 224 * 3


def test_packed_regions_of_a_level_without_raw_tiles_carry_its_pixels(testdata):
    slide = open_slide(testdata / "plain-tiff" / "kidney-48-5.tif", mpp=0.5, cache=False)  # stripped
    reader = CompressedTileReader(slide)
    blobs = packed_equal_read_batch(reader, [(10, 20), (600, 300)], 128, 0.5)
    assert tiledecode.unpack_region(blobs[0]).tiles[0].codec.name == "raw"


def test_bytes_that_are_not_a_packed_region_are_refused(synthetic):
    blob = CompressedTileReader.for_slide(open_slide(synthetic, cache=False)).packed_regions(
        [(0, 0)], 64, 0.5
    )[0]
    for bad in (b"", b"JUNKJUNKJUNK", blob[:40], blob[:-10]):
        with pytest.raises(tiledecode.TileDecodeError):
            tiledecode.decode_regions([bad])


# -- decoding machinery ------------------------------------------------------------------------


def test_worker_processes_decode_the_same_pixels(cmu, jpeg_tiff):
    tiles = compressed_tiles(cmu, 0, range(12))
    tiles += CompressedTileReader(open_slide(jpeg_tiff, cache=False)).compressed_tiles(1, range(4))
    inline = decode_tiles_cpu(tiles)
    assert all(np.array_equal(a, b) for a, b in zip(decode_tiles_cpu(tiles, workers=2), inline, strict=True))
    tensors = decode_tiles(tiles, device="cpu")
    assert all(np.array_equal(t.permute(1, 2, 0).numpy(), a) for t, a in zip(tensors, inline, strict=True))


def test_a_tile_the_file_leaves_out_is_glass():
    codec = TileCodec(compression=7, photometric=2, samples=3, predictor=1, tile_w=64, tile_h=32)
    layout = TileLayout(level=0, width=100, height=40, offsets=(0,) * 4, bytecounts=(0,) * 4, codec=codec)
    tile = layout.tile(3, b"")
    assert (tile.x, tile.y, tile.width, tile.height) == (64, 32, 36, 8)
    assert (
        tiledecode.FILL == FILL
        and (decode_tile(tile) == FILL).all()
        and decode_tile(tile).shape == (32, 64, 3)
    )


def test_a_corrupt_tile_names_itself(testdata):
    slide = open_slide(testdata / "broken" / "unreadable.svs", cache=False)
    with pytest.raises(SlideReadError, match=r"tile \(0, 0\) of level 0 \(jpeg\) does not decode"):
        CompressedTileReader(slide).read_region(0, 0, 0, 16)


def test_an_unknown_device_lists_the_known_ones(cmu):
    with pytest.raises(ValueError, match="known: cpu, cuda"):
        decode_tiles(compressed_tiles(cmu, 0, [0]), device="meta")


def test_the_decoder_module_needs_neither_ray_nor_pydantic():
    """benchmarks/gpu_decode.py runs on a GPU box with torch and tifffile only."""
    code = (
        "import sys, pathray.wsi.tiledecode; "
        "bad = {'ray', 'pydantic', 'torch', 'tiffslide', 'zarr', 'imagecodecs'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- remote and GPU ------------------------------------------------------------------------------


@pytest.mark.s3
def test_remote_tiles_are_the_local_bytes_fetched_by_range(object_store, s3_storage, testdata):
    local = testdata / "aperio" / "CMU-1-Small-Region.svs"
    uri = object_store.upload_file(local, object_store.url_for("wsi-tests/compressed-cmu.svs"))
    exact = s3_storage.model_copy(update={"coalesce_gap": 0})
    remote = open_slide(uri, exact, cache=False)
    reader = CompressedTileReader(remote)
    wanted = [0, 1, 2, 50, 129]
    before = remote.bytes_read
    tiles = reader.compressed_tiles(0, wanted)
    assert remote.bytes_read - before == sum(reader.layout(0).bytecounts[i] for i in wanted)
    assert [t.data for t in tiles] == [
        t.data for t in compressed_tiles(open_slide(local, cache=False), 0, wanted)
    ]
    got = reader.read_region(500, 700, 0, (400, 300)).permute(1, 2, 0).numpy()
    assert np.array_equal(got, remote.read_region(500, 700, 0, (400, 300)))


def test_without_imagecodecs_pil_decodes_the_same_pixels(cmu):
    """A GPU box may lack imagecodecs: its CPU decoder is then PIL, with the same pixels."""
    (tile,) = compressed_tiles(cmu, 0, [40])
    code = (
        "import sys; sys.modules['imagecodecs'] = None; "
        "from pathray.wsi.tiledecode import decode_jpeg_cpu; "
        "sys.stdout.buffer.write(decode_jpeg_cpu(sys.stdin.buffer.read()).tobytes())"
    )
    out = subprocess.run([sys.executable, "-c", code], input=tile.data, capture_output=True, check=True)
    assert out.stdout == decode_jpeg_cpu(tile.data).tobytes()


def test_benchmark_runs_its_cpu_half_without_a_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    cmd = [sys.executable, str(BENCHMARK), "--size", "1024", "--tiles", "32", "--batch", "16"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300, cwd=tmp_path)
    lines = out.stdout.strip().splitlines()
    assert "synthetic Aperio-style (RGB, JPEGTables): 16 tiles 256x256" in out.stdout
    assert lines[-1].startswith("gpu_decode tiles_per_s cpu=") and "ray imported: no" in lines
    if not torch.cuda.is_available():
        assert "cuda=skipped ratio=n/a" in lines[-1] and "cuda (skipped: no CUDA device)" in out.stdout


@pytest.mark.gpu
def test_nvjpeg_decodes_the_same_pixels(cmu, jpeg_tiff, synthetic):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for slide in (cmu, open_slide(jpeg_tiff, cache=False)):
        reader = CompressedTileReader(slide)
        tiles = reader.compressed_tiles(0, range(len(reader.layout(0).offsets)))
        for g, c in zip(decode_tiles(tiles, device="cuda"), decode_tiles(tiles, device="cpu"), strict=True):
            assert g.is_cuda
            assert_close(g.cpu().permute(1, 2, 0).numpy(), c.permute(1, 2, 0).numpy(), GPU_MAX_ABS, MEAN_ABS)
    slide = open_slide(synthetic, cache=False)
    coords = [(37 + 211 * i, 1700 - 173 * i) for i in range(8)]
    got = CompressedTileReader(slide).read_batch(coords, 224, 0.7, device="cuda")
    assert got.is_cuda
    for g, w in zip(got.cpu().permute(0, 2, 3, 1).numpy(), slide.read_batch(coords, 224, 0.7), strict=True):
        assert_close(g, w, GPU_MAX_ABS, MEAN_ABS)


def test_tiles_that_regions_share_are_decoded_once_and_only_within_their_slide(
    synthetic, jpeg_tiff, monkeypatch
):
    """Overlapping regions (as one batch's are) decode each stored tile once; two slides' tiles at
    the same level and index are not taken for each other."""
    decoded: list[int] = []
    real = tiledecode.decode_tiles

    def counting(tiles, *args, **kwargs):
        decoded.append(len(tiles))
        return real(tiles, *args, **kwargs)

    monkeypatch.setattr(tiledecode, "decode_tiles", counting)
    coords = [(400 + 30 * i, 500 + 20 * i) for i in range(8)]  # 8 regions over the same few tiles
    readers = [
        CompressedTileReader.for_slide(open_slide(synthetic, cache=False)),
        CompressedTileReader.for_slide(open_slide(jpeg_tiff, mpp=0.25, cache=False)),
    ]
    blobs = [b for r in readers for b in r.packed_regions(coords, 224, 0.5)]
    got = tiledecode.decode_regions(blobs).permute(0, 2, 3, 1).numpy()
    want = [w for r in readers for w in r.read_batch(coords, 224, 0.5).permute(0, 2, 3, 1).numpy()]
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, 0, 0.0)
    tiles = [t for b in blobs for t in tiledecode.unpack_region(b).tiles]
    stored = {(t.codec, t.data) for t in tiles}
    assert decoded == [len(stored)]
    assert len(stored) < len(tiles) / 2  # the regions did share tiles
    per_slide = [
        {(t.level, t.index) for b in bs for t in tiledecode.unpack_region(b).tiles}
        for bs in (blobs[:8], blobs[8:])
    ]
    assert per_slide[0] & per_slide[1]  # both slides have tiles at the same (level, index)
