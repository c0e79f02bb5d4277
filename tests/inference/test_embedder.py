"""Tile embeddings, Ray-free: the per-slide file (local and S3, footer-only source reads, another model
refused), the embedder's weights digest, and the engines' pooled-only path equal to their full forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pathray.inference.embeddings import (
    EmbeddingFileError,
    EmbeddingSource,
    SlideEmbeddings,
    is_complete,
    read_slide_embeddings,
    read_source,
    slide_embeddings_uri,
    write_slide_embeddings,
)

TINY = {"model_kwargs": {"depth": 1}, "tile_size": 32, "mpp": 2.0, "device": "cpu"}


def table(
    n: int = 50, dim: int = 8, source: EmbeddingSource | None = None, slide_id: str = "case-01"
) -> SlideEmbeddings:
    rng = np.random.default_rng(n)
    source = source or EmbeddingSource("vit_tiny_patch16_224", "ab" * 32, dim, {"preset": "x"}, True)
    return SlideEmbeddings(
        slide_id=slide_id,
        x=rng.integers(0, 10_000, n),
        y=rng.integers(0, 10_000, n),
        mpp=np.full(n, 0.5, np.float32),
        size=np.full(n, 224, np.int32),
        tissue=rng.random(n).astype(np.float32),
        embeddings=rng.standard_normal((n, dim)).astype(np.float16),
        source=source,
    )


def assert_same(a: SlideEmbeddings, b: SlideEmbeddings) -> None:
    assert (a.slide_id, a.source) == (b.slide_id, b.source)
    for name in ("x", "y", "mpp", "size", "tissue", "embeddings"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert b.embeddings.dtype == np.float16


@pytest.mark.s3
@pytest.mark.parametrize("where", ["local", "s3"])
def test_file_round_trip(where, tmp_path, s3_storage, object_store):
    storage = s3_storage if where == "s3" else None
    out = f"s3://{object_store.bucket}/embedder-test" if where == "s3" else str(tmp_path)
    for rows in (50, 0):  # a slide without tissue is an empty file (its id: the file's name)
        written = table(rows, slide_id=f"case-{rows}")
        uri = slide_embeddings_uri(out, f"case-{rows}")
        write_slide_embeddings(uri, written, storage)
        assert_same(written, read_slide_embeddings(uri, storage))
        assert read_source(uri, storage) == written.source
    assert read_source(slide_embeddings_uri(out, "nowhere"), storage) is None


def test_source_is_read_from_the_footer_alone(tmp_path, monkeypatch):
    import pathray.inference.embeddings as embeddings

    uri = str(tmp_path / "big.parquet")
    write_slide_embeddings(uri, table(20_000, 64))
    size = (tmp_path / "big.parquet").stat().st_size
    ranges: list[tuple[int, int]] = []
    real = embeddings.call

    def spy(location, storage, method, *args, **kwargs):
        if method == "cat_file":
            ranges.append((kwargs["start"], kwargs["end"]))
        return real(location, storage, method, *args, **kwargs)

    monkeypatch.setattr(embeddings, "call", spy)
    assert read_source(uri) == table(20_000, 64).source
    assert len(ranges) == 2 and sum(end - start for start, end in ranges) < size / 50


def test_is_complete_refuses_another_models_file_and_a_foreign_one(tmp_path):
    mine = table().source
    uri = str(tmp_path / "case-01.parquet")
    assert not is_complete(uri, mine)
    write_slide_embeddings(uri, table())
    assert is_complete(uri, mine)
    other = EmbeddingSource("uni", "cd" * 32, 8)
    with pytest.raises(EmbeddingFileError, match="another --out") as err:
        is_complete(uri, other)
    assert "vit_tiny_patch16_224" in str(err.value) and "uni" in str(err.value)
    (tmp_path / "foreign.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(EmbeddingFileError, match="not a Parquet file"):
        is_complete(str(tmp_path / "foreign.parquet"), mine)


def test_digest_is_stable_and_follows_the_weights(tmp_path):
    from safetensors.torch import save_file

    from pathray.inference.embedder import load_embedder
    from pathray.models.timm_compat import import_timm

    first = load_embedder("vit_tiny_patch16_224", **TINY)
    again = load_embedder("vit_tiny_patch16_224", **TINY)
    assert first.source == again.source and first.source.random_init  # random weights, seeded
    assert first.source.embed_dim == 192 and (first.tile_size, first.mpp) == (32, 2.0)
    digests = set()
    for seed in (1, 2):
        torch.manual_seed(seed)
        backbone = import_timm().create_model("vit_tiny_patch16_224", num_classes=0, depth=1)
        path = tmp_path / f"w{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
        loaded = load_embedder("vit_tiny_patch16_224", weights=str(path), **TINY)
        assert not loaded.source.random_init
        assert loaded.source == load_embedder("vit_tiny_patch16_224", weights=str(path), **TINY).source
        digests.add(loaded.source.weights_sha256)
    assert len(digests | {first.source.weights_sha256}) == 3


@pytest.mark.parametrize(
    "overrides",
    [
        {"name": "debug_vit"},
        {"name": "debug_vit", "pooling": "cls+mean", "decoder_blocks": [0, 1]},
        {"name": "debug_cnn"},
    ],
    ids=["vit", "vit-cls+mean-intermediates", "cnn"],
)
def test_pooled_path_equals_the_full_forward(overrides):
    from pathray.models.config import EngineConfig
    from pathray.models.engines import build_engine

    torch.manual_seed(0)
    engine = build_engine(EngineConfig(**overrides)).eval()
    tiles = torch.randint(0, 256, (3, 40, 40, 3), dtype=torch.uint8)  # 40: not a multiple of the patch
    with torch.inference_mode():
        x = engine.normalize(tiles)
        full, _ = engine(x)
        pooled = engine.pooled(x)
    assert pooled.shape == (3, engine.embed_dim)
    torch.testing.assert_close(pooled, full, rtol=1e-5, atol=1e-5)


def test_embedder_of_a_model_package_is_its_engines_pooled_output(tmp_path, save_package):
    from pathray.inference.embedder import load_embedder
    from pathray.models.package import read_model_package

    uri = save_package(tmp_path / "model", "task.name=classification", "data.stream.sampler.size=64")
    embedder = load_embedder(uri, device="cpu")
    assert not embedder.source.random_init and embedder.tile_size == 64
    tiles = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    built, _ = read_model_package(uri).build("cpu")
    with torch.inference_mode():
        pooled, _ = built.engine(built.engine.normalize(torch.from_numpy(tiles)))
    np.testing.assert_allclose(embedder.embed(tiles).astype(np.float32), pooled.numpy(), atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="brings its own weights"):
        load_embedder(uri, weights="w.safetensors", device="cpu")
