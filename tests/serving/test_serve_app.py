"""The Serve app over real HTTP on 127.0.0.1: security, end-to-end analyses, failures, autoscaling, faults.

One Serve instance (on real local Ray) serves every test of this module. Its model store and
results store are bucket prefixes on the SeaweedFS endpoint (127.0.0.1); model packages are saved
there from debug engines; slides are synthetic, on disk and in the bucket.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

TOKEN_ENV = "PATHRAY_TEST_SERVE_TOKEN"  # set by conftest before Ray starts, as a cluster's environment
TOKEN = os.environ[TOKEN_ENV]
APP = "pathray"


@dataclass
class Service:
    url: str
    root: Path
    slides: Path
    outside: Path
    output: str  # bucket/prefix of the results store
    s3_slides: str  # s3:// prefix of the slides in the bucket
    fs: object  # s3fs of the endpoint
    client: httpx.Client

    def stored(self, analysis_id: str, name: str) -> bytes:
        return self.fs.cat_file(f"{self.output}/{analysis_id}/{name}")  # type: ignore[attr-defined]

    def stored_ids(self) -> list[str]:
        self.fs.invalidate_cache()  # type: ignore[attr-defined]
        try:
            return [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.output)]  # type: ignore[attr-defined]
        except FileNotFoundError:
            return []

    def post(self, body: object, **kw: object) -> httpx.Response:
        return self.client.post("/v1/analyses", json=body, **kw)  # type: ignore[arg-type]

    def wait(self, analysis_id: str, timeout: float = 180.0, seen: list | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.client.get(f"/v1/analyses/{analysis_id}").json()
            if seen is not None:
                seen.append(doc["progress"]["done_tiles"])
            if doc["status"] in ("done", "failed"):
                return doc
            time.sleep(0.2)
        raise AssertionError(f"analysis {analysis_id} did not end in {timeout} s: {doc}")


def model_replicas() -> int:
    from ray import serve

    states = serve.status().applications[APP].deployments["ModelServer"].replica_states
    return int(states.get("RUNNING", 0))


@pytest.fixture(scope="module")
def service(ray_local, object_store, s3_storage, tmp_path_factory, save_package) -> Service:
    from ray import serve

    from pathray.serving.app import load_app_config
    from pathray.serving.run import start_app
    from pathray.wsi.synth import SynthConfig, write_synthetic_slides

    root = tmp_path_factory.mktemp("serve")
    slides, outside = root / "slides", root / "outside"
    write_synthetic_slides(slides, 1, seed=0, config=SynthConfig(size=4096))
    write_synthetic_slides(slides / "big", 1, seed=1, config=SynthConfig(size=6144))
    outside.mkdir()
    (slides / "broken.svs").write_bytes(b"this is not a slide" * 10)
    models, output = object_store.url_for("serve-models"), object_store.url_for("serve-out")
    s3_slides = object_store.url_for("serve-slides")
    object_store.upload_file(slides / "slide_000.svs", f"{s3_slides}/a.svs")
    object_store.upload_file(slides / "big" / "slide_000.svs", f"{s3_slides}/big.svs")
    # weights without their model.yaml: not a package
    object_store.upload_file(slides / "broken.svs", f"{models}/not-a-model/weights.safetensors")
    save_package(root / "models" / "seg", meta={"run": "test"})
    # 128 px at 0.5 µm/px: reads level 1 of a synthetic slide, while masks and thumbnails use level 2
    save_package(
        root / "models" / "seg-fine", "data.stream.sampler.size=128", "data.stream.sampler.mpps=[0.5]"
    )
    save_package(root / "models" / "seg-vit" / "model", "engine.name=debug_vit")  # a training run's layout
    # a public foundation model's preset (kaiko ViT-S/16, random init here): 224 px at 0.5 µm/px
    save_package(
        root / "models" / "kaiko", "engine.name=foundation", "engine.model=null", "engine.preset=kaiko_vits16"
    )
    # an SSL run's export: a backbone whose output is its embedding
    save_package(root / "models" / "embed", "engine.name=debug_vit", "task.name=embedding")
    (root / "models" / "seg-vit" / "checkpoints").mkdir()
    (root / "models" / "seg-vit" / "checkpoints" / "step-1.pt").write_bytes(b"x")
    object_store.upload_dir(root / "models", models)
    cfg = load_app_config(
        {
            # short storage deadlines: the endpoint-killed test fails in seconds, not a minute
            "storage": s3_storage.model_dump() | {"read_timeout_s": 2, "retries": 3, "deadline_s": 6},
            "inference": {"chunk_tiles": 4, "read_threads": 2, "batch_size": 16, "max_failed_share": 0.25},
            "serve": {
                "models": models,
                "output": output,
                "http": {"port": 0, "app_name": APP},
                "ingress": {
                    "num_cpus": 0.25,
                    "inflight_chunks": 2,
                    "max_body_bytes": 4096,
                    "chunk_retries": 6,
                    "retry_backoff_s": 0.5,
                    "status_interval_s": 0.5,
                    "stale_after_s": 4,
                },
                "model": {
                    "num_cpus": 1,
                    "max_ongoing_requests": 2,
                    "autoscaling": {
                        "min_replicas": 1,
                        "max_replicas": 2,
                        "target_ongoing_requests": 1,
                        "upscale_delay_s": 1,
                        "downscale_delay_s": 3,
                        "look_back_period_s": 2,
                        "metrics_interval_s": 0.5,
                    },
                },
                "security": {
                    "allowed_prefixes": [f"file://{slides}/", f"{s3_slides}/", "http://127.0.0.1:9/wsi/"],
                    "token_env": TOKEN_ENV,
                },
            },
        }
    )
    url = start_app(cfg)
    client = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        fs = object_store._admin_fs()
        yield Service(url, root, slides, outside, output.removeprefix("s3://"), s3_slides, fs, client)
    finally:
        client.close()
        serve.shutdown()


# -- security ---------------------------------------------------------------------------------
def test_health_and_docs_are_open_but_v1_needs_the_token(service):
    assert httpx.get(f"{service.url}/healthz").json() == {"status": "ok"}
    assert "/v1/analyses" in httpx.get(f"{service.url}/openapi.json").json()["paths"]
    assert httpx.get(f"{service.url}/docs").status_code == 200
    body = {"slide": str(service.slides / "slide_000.svs"), "model": "seg"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/analyses"), ("GET", "/v1/analyses/abc")):
            r = httpx.request(method, f"{service.url}{path}", json=body, headers=headers)
            assert r.status_code == 401, (headers, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    assert service.stored_ids() == []


def test_models_are_listed_and_unknown_ones_get_404_with_the_known_ids(service):
    listed = service.client.get("/v1/models").json()["models"]
    assert [m["id"] for m in listed] == ["embed", "kaiko", "seg", "seg-fine", "seg-vit"]
    models = {m["id"]: m for m in listed}
    assert models["seg"]["task"] == "segmentation" and models["seg"]["engine"] == "debug_cnn"
    assert models["seg-vit"]["engine"] == "debug_vit"  # served from a run folder's model/ package
    assert (models["seg-fine"]["tile_size"], models["seg-fine"]["mpp"]) == (128, 0.5)
    for model in ("nope", "../seg", "not-a-model"):
        r = service.post({"slide": str(service.slides / "slide_000.svs"), "model": model})
        assert r.status_code == 404
        assert r.json()["detail"]["known"] == ["embed", "kaiko", "seg", "seg-fine", "seg-vit"]


def test_an_embedding_package_is_listed_and_analyses_with_it_get_422(service):
    models = {m["id"]: m for m in service.client.get("/v1/models").json()["models"]}
    assert models["embed"]["task"] == "embedding" and models["embed"]["engine"] == "debug_vit"
    r = service.post({"slide": str(service.slides / "slide_000.svs"), "model": "embed"})
    assert r.status_code == 422 and "is an embedding model" in r.json()["detail"], r.text


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _opened_by_someone(fifo: Path) -> bool:
    """A FIFO opened for reading lets a non-blocking writer in; unopened, it refuses (ENXIO)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return False
    os.close(fd)
    return True


def test_slides_outside_the_allowed_prefixes_are_refused_and_never_opened(service):
    secret = _fifo(service.outside / "secret.svs")
    (service.slides / "escape.svs").symlink_to(secret)
    (service.slides / "linkdir").symlink_to(service.outside, target_is_directory=True)
    s = service.slides
    cases = {
        403: [
            "file:///etc/passwd",
            "/etc/passwd",
            f"file://{secret}",
            str(secret),
            f"file://{s}/../outside/secret.svs",
            f"file://{s}/%2e%2e/outside/secret.svs",
            f"file://{s}/escape.svs",
            f"file://{s}/linkdir/secret.svs",
            f"file://127.0.0.1{s}/slide_000.svs",
            "s3://other-bucket/a.svs",
            f"{service.s3_slides}-evil/a.svs",
            f"{service.s3_slides}/../serve-models/seg/model.pt",
            service.s3_slides.replace("serve-slides", "serve-models/seg/model.pt"),
            "gs://slides/a.svs",
            "http://127.0.0.1:8/wsi/a.svs",
            "http://169.254.169.254/latest/meta-data/",
            "ftp://127.0.0.1/wsi/a.svs",
        ],
        422: [
            "",
            "slide_000.svs",
            f"file://{s}/slide_000.svs?x=1",
            f"file://{s}/%252e%252e/outside/secret.svs",
            f"file://{s}/a\\..\\..\\secret.svs",
            f"file://{s}/a%00.svs",
        ],
    }
    for status, uris in cases.items():
        for uri in uris:
            for path in ("/v1/analyses", "/v1/embeddings"):  # one set of rules for both
                r = service.client.post(path, json={"slide": uri, "model": "seg"})
                assert r.status_code == status, (path, uri, r.text)
                assert r.json()["detail"], uri
    time.sleep(1.0)
    assert not _opened_by_someone(secret)
    assert service.stored_ids() == []


def test_a_slide_is_embedded_over_http_into_the_file_pathray_embed_writes(service):
    """POST /v1/embeddings runs like an analysis (202, status, then the file): every tissue tile
    of the slide's grid at the model's tile size and mpp, embedded by the model replicas, equal to
    the package's own embedder on the same tiles read directly, in the embedding file format."""
    import numpy as np

    from pathray.inference.config import InferenceConfig
    from pathray.inference.embedder import load_embedder
    from pathray.inference.embeddings import from_parquet
    from pathray.serving.embed import plan_slide_tiles
    from pathray.storage import StorageConfig
    from pathray.wsi.backends.open import open_slide
    from pathray.wsi.patching.tissue import TissueConfig

    slide = service.slides / "slide_000.svs"
    r = service.client.post("/v1/embeddings", json={"slide": str(slide), "model": "embed"})
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    assert r.headers["location"] == f"/v1/embeddings/{job}" and r.json()["kind"] == "embedding"
    deadline = time.monotonic() + 180
    while (doc := service.client.get(f"/v1/embeddings/{job}").json())["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline, doc
        time.sleep(0.2)
    assert doc["status"] == "done", doc
    assert service.client.get(f"/v1/analyses/{job}").status_code == 404  # not an analysis
    data = service.client.get(f"/v1/embeddings/{job}/embeddings.parquet").content
    assert data == service.stored(job, "embeddings.parquet")
    table = from_parquet(data)

    embedder = load_embedder(str(service.root / "models" / "embed"), device="cpu")
    # the same model as `pathray embed --model <package>` (named by where the store keeps it)
    assert table.source.same_model(embedder.source) and table.source.model.endswith("/serve-models/embed")
    tile, mpp = embedder.tile_size, embedder.mpp
    planned = plan_slide_tiles(
        "slide_000",
        str(slide),
        None,
        tile,
        mpp,
        0.0,
        InferenceConfig().min_tissue,
        StorageConfig(),
        TissueConfig(),
    )
    n = int(planned["n_tiles"][0])
    assert n > 8 and doc["progress"]["total_tiles"] == n == len(table)
    assert np.array_equal(table.x, planned["x"]) and np.array_equal(table.y, planned["y"])
    assert (table.size == tile).all() and np.allclose(table.mpp, mpp) and table.slide_id == "slide_000"
    coords = list(zip(table.x[:8].tolist(), table.y[:8].tolist(), strict=True))
    direct = embedder.embed(open_slide(str(slide)).read_batch(coords, tile, mpp))
    np.testing.assert_allclose(
        table.embeddings[:8].astype(np.float32), direct.astype(np.float32), rtol=1e-2, atol=1e-2
    )

    assert (
        service.client.post("/v1/embeddings", json={"slide": str(slide), "model": "nope"}).status_code == 404
    )
    bad = {"slide": str(slide), "model": "embed", "overlap": 0.9}
    assert service.client.post("/v1/embeddings", json=bad).status_code == 422
    assert service.client.get(f"/v1/embeddings/{job}/summary.json").status_code == 404


def test_malformed_bodies_get_422_and_large_ones_413(service):
    good = {"slide": str(service.slides / "slide_000.svs"), "model": "seg"}
    for body in ({"slide": good["slide"]}, {**good, "extra": 1}, {**good, "outputs": ["x.png"]}, [1], "x"):
        assert service.post(body).status_code == 422, body
    r = service.client.post(
        "/v1/analyses", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422
    big = {**good, "outputs": ["summary.json"] * 1000}
    r = service.post(big)
    assert r.status_code == 413 and "4096" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit holds for streamed bodies too
        yield b'{"slide": "' + b"a" * 3000
        yield b"a" * 3000 + b'", "model": "seg"}'

    r = service.client.post("/v1/analyses", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


# -- analyses ---------------------------------------------------------------------------------
def test_an_analysis_over_http_runs_to_done_with_progress_and_files(service):
    from PIL import Image

    r = service.post({"slide": f"file://{service.slides}/slide_000.svs", "model": "seg"})
    assert r.status_code == 202, r.text
    analysis_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/analyses/{analysis_id}"
    seen: list[int] = []
    doc = service.wait(analysis_id, seen=seen)
    assert doc["status"] == "done", doc
    progress = doc["progress"]
    assert progress["total_tiles"] > 8 and progress["done_tiles"] == progress["total_tiles"]
    assert progress["chunks_total"] == -(-progress["total_tiles"] // 4) == progress["chunks_done"]
    assert seen == sorted(seen)
    assert {"plan_s", "predict_s", "write_s", "total_s"} <= set(doc["timings"])

    files = {n: service.client.get(doc["links"][n]) for n in ("overlay.png", "mask.png")}
    for name, resp in files.items():
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
        assert min(Image.open(io.BytesIO(resp.content)).size) > 10, name
    geo = service.client.get(doc["links"]["annotations.geojson"]).json()
    assert geo["type"] == "FeatureCollection" and geo["features"]
    assert all(f["properties"]["classification"]["name"] for f in geo["features"])
    summary = service.client.get(doc["links"]["summary.json"]).json()
    assert summary["tiles"] == summary["tiles_done"] == progress["total_tiles"]
    assert summary["model"] == "seg" and sum(summary["areas_mm2"].values()) > 0
    # results live in the bucket, under <output>/<id>/
    assert json.loads(service.stored(analysis_id, "status.json"))["status"] == "done"
    assert json.loads(service.stored(analysis_id, "summary.json")) == summary


def test_a_foundation_preset_package_is_served(service):
    """A package of a public foundation model's preset is rebuilt by the replicas from its model.yaml
    alone (architecture, normalisation, pooling) and analyses a slide at the preset's tiles."""
    kaiko = {m["id"]: m for m in service.client.get("/v1/models").json()["models"]}["kaiko"]
    assert (kaiko["engine"], kaiko["preset"], kaiko["tile_size"], kaiko["mpp"]) == (
        "foundation",
        "kaiko_vits16",
        224,
        0.5,
    )
    doc = service.wait(
        service.post({"slide": f"{service.slides}/slide_000.svs", "model": "kaiko"}).json()["id"]
    )
    assert doc["status"] == "done", doc
    summary = service.client.get(doc["links"]["summary.json"]).json()
    assert summary["model"] == "kaiko" and summary["tiles"] == summary["tiles_done"] > 0


def test_remote_client_analyses_a_slide_in_the_bucket_with_a_second_model(service, tmp_path):
    from pathray.serving.client import RemoteAnalysisError, analyze_remote

    calls: list[tuple[int, int]] = []
    summary = analyze_remote(
        service.url,
        f"{service.s3_slides}/a.svs",
        "seg-vit",
        tmp_path,
        TOKEN,
        lambda d, t: calls.append((d, t)),
    )
    assert summary["model"] == "seg-vit" and calls[-1][0] == calls[-1][1] == summary["tiles"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["overlay.png", "mask.png", "annotations.geojson", "summary.json"]
    )
    with pytest.raises(RemoteAnalysisError) as info:
        analyze_remote(service.url, "/etc/passwd", "seg", tmp_path / "x", TOKEN)
    assert info.value.status == 403
    with pytest.raises(RemoteAnalysisError) as info:
        analyze_remote(service.url, f"{service.slides}/slide_000.svs", "seg", tmp_path / "x", "wrong")
    assert info.value.status == 401


def test_unreadable_slides_fail_with_a_reason_and_the_service_goes_on(service):
    broken = service.post({"slide": f"{service.slides}/broken.svs", "model": "seg"}).json()["id"]
    missing = service.post({"slide": f"{service.slides}/missing.svs", "model": "seg"}).json()["id"]
    good = service.post({"slide": f"{service.slides}/slide_000.svs", "model": "seg"}).json()["id"]
    doc = service.wait(broken)
    assert doc["status"] == "failed" and "not a TIFF" in doc["reason"], doc
    doc = service.wait(missing)
    assert doc["status"] == "failed" and "no slide at" in doc["reason"], doc
    r = service.client.get(f"/v1/analyses/{missing}/summary.json")
    assert r.status_code == 409
    doc = service.wait(good)
    assert doc["status"] == "done" and doc["progress"]["done_tiles"] == doc["progress"]["total_tiles"]
    assert service.client.get("/v1/analyses/0123456789abcdef").status_code == 404
    assert service.client.get(f"/v1/analyses/{good}/passwd").status_code == 404


def test_an_endpoint_killed_mid_analysis_fails_it_cleanly_and_the_next_one_runs(
    service, object_store, assert_no_secrets
):
    """SeaweedFS dies while a slide in it is analysed: the analysis fails with a reason that names
    the slide and carries no signed URL; the service stays up and, once the endpoint is back on the
    same port, analyses that slide to the end."""
    slide = f"{service.s3_slides}/big.svs"
    analysis_id = service.post({"slide": slide, "model": "seg"}).json()["id"]
    try:
        _wait_for(
            lambda: service.client.get(f"/v1/analyses/{analysis_id}").json()["progress"]["done_tiles"] > 0,
            120,
            "the first chunk",
        )
        object_store.kill()
        doc = service.wait(analysis_id, timeout=90)
        assert service.client.get("/healthz").json() == {"status": "ok"}
    finally:
        object_store.restart()
    assert doc["status"] == "failed", doc
    assert doc["reason"].startswith(f"SlideUnavailableError: storage unavailable for {slide}"), doc
    assert 0 < doc["progress"]["done_tiles"] < doc["progress"]["total_tiles"], doc
    assert_no_secrets(json.dumps(doc), ray_logs=True)  # the reason, and every log of every replica
    again = service.wait(service.post({"slide": slide, "model": "seg"}).json()["id"])
    assert again["status"] == "done", again
    assert again["progress"]["done_tiles"] == again["progress"]["total_tiles"]


def test_a_slide_without_mpp_is_analysed_with_the_request_mpp_and_refused_without(
    service, testdata, tmp_path
):
    import shutil

    from pathray.serving.client import analyze_remote

    slide = service.slides / "tcga.svs"  # no mpp in its metadata, as is common in TCGA
    shutil.copyfile(testdata / "aperio" / "tcga-cr-7395-01a-01-ts1.svs", slide)
    doc = service.wait(service.post({"slide": str(slide), "model": "seg"}).json()["id"])
    assert doc["status"] == "failed" and doc["mpp"] is None, doc
    assert doc["reason"].startswith(f"SlideReadError: cannot read {slide}: the slide has no usable mpp"), doc
    assert '"mpp": 0.25 in the request body' in doc["reason"]
    summary = analyze_remote(service.url, str(slide), "seg", tmp_path, TOKEN, mpp=0.5)
    assert summary["slide_mpp"] == 0.5 and summary["tiles"] > 10 and summary["tiles_done"] == summary["tiles"]
    assert service.client.get(f"/v1/analyses/{summary['id']}").json()["mpp"] == 0.5
    assert sum(summary["areas_mm2"].values()) > 0
    for mpp in (0, -0.25, 352.8, "abc", None):
        body = {"slide": str(slide), "model": "seg", "mpp": mpp}
        if mpp is None:
            continue  # null is "the slide's own": covered above
        r = service.post(body)
        assert r.status_code == 422, (mpp, r.text)
        assert r.json()["detail"][0]["loc"] == ["body", "mpp"], r.text


def _corrupt(path: Path, level: int, indices: list[int]) -> None:
    """Overwrite the start of JPEG tiles ``indices`` of ``level``: they no longer decode."""
    from tiffslide import TiffSlide

    offsets = TiffSlide(path).ts_tifffile.series[0].levels[level].keyframe.dataoffsets
    with open(path, "r+b") as fh:
        for i in indices:
            fh.seek(offsets[i])
            fh.write(b"\x00" * 64)


def test_undecodable_tiles_are_counted_and_marked_and_too_many_fail_the_analysis(service):
    """A few broken JPEG tiles: the analysis finishes and lists exactly the tiles the in-process
    analysis lists (summary.json, progress, hatched overlay); every other tile broken: it fails,
    naming the slide, the count and the share."""
    import shutil

    import numpy as np
    from PIL import Image

    from pathray.inference.analyze import analyze_slide
    from pathray.inference.config import InferenceConfig
    from pathray.inference.outputs import FAILED_COLOR
    from pathray.inference.predictor import Predictor

    damaged, wrecked = service.slides / "damaged.svs", service.slides / "wrecked.svs"
    shutil.copyfile(service.slides / "slide_000.svs", damaged)
    shutil.copyfile(service.slides / "slide_000.svs", wrecked)
    from tiffslide import TiffSlide

    page = TiffSlide(damaged).ts_tifffile.series[0].levels[1].keyframe
    per_row = -(-page.imagewidth // page.tilewidth)
    _corrupt(damaged, 1, [per_row * 3 + 3, per_row * 4 + 5])  # two tiles inside the synthetic tissue
    _corrupt(wrecked, 1, list(range(0, len(page.dataoffsets), 2)))
    local = Predictor.from_package(
        str(service.root / "models" / "seg-fine"), config=InferenceConfig(max_failed_share=1)
    )
    expected = {tuple(xy) for xy in analyze_slide(str(damaged), local).failed_tiles}
    assert expected

    doc = service.wait(service.post({"slide": str(damaged), "model": "seg-fine"}).json()["id"])
    assert doc["status"] == "done", doc
    assert doc["progress"]["failed_tiles"] == len(expected)
    assert doc["progress"]["done_tiles"] == doc["progress"]["total_tiles"]
    summary = service.client.get(doc["links"]["summary.json"]).json()
    assert summary["tiles_failed"] == len(expected) < 0.25 * summary["tiles"]
    assert {tuple(xy) for xy in summary["failed_tiles"]["xy"]} == expected
    assert "does not decode" in summary["failed_tiles"]["cause"]
    overlay = np.asarray(Image.open(io.BytesIO(service.client.get(doc["links"]["overlay.png"]).content)))
    assert (overlay[..., :3] == FAILED_COLOR).all(axis=-1).sum() > 10

    doc = service.wait(service.post({"slide": str(wrecked), "model": "seg-fine"}).json()["id"])
    assert doc["status"] == "failed", doc
    reason = doc["reason"]
    assert reason.startswith(f"TilesLostError: cannot read {wrecked}: "), reason
    assert (
        "tiles (" in reason and "could not be decoded, more than inference.max_failed_share (25 %)" in reason
    )
    lost, total = (int(v) for v in reason.split(": ")[2].split(" tiles")[0].split(" of "))
    assert lost / total > 0.25 and total == doc["progress"]["total_tiles"]
    assert service.client.get(f"/v1/analyses/{doc['id']}/summary.json").status_code == 409


# -- scaling and faults ------------------------------------------------------------------------
def _wait_for(predicate, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.25)
    raise AssertionError(f"{what} did not happen in {timeout} s")


def test_concurrent_analyses_scale_the_model_deployment_to_two_and_back(service):
    _wait_for(lambda: model_replicas() == 1, 60, "one model replica")
    big = f"{service.slides}/big/slide_000.svs"
    ids: list[str] = []

    def scaled() -> bool:
        running = [i for i in ids if service.client.get(f"/v1/analyses/{i}").json()["status"] != "done"]
        if len(running) < 3:  # keep the load up until Serve reacts
            ids.append(service.post({"slide": big, "model": "seg"}).json()["id"])
        return model_replicas() == 2

    _wait_for(scaled, 120, "scaling up to 2 model replicas")
    for analysis_id in ids:
        doc = service.wait(analysis_id)
        assert doc["status"] == "done" and doc["progress"]["done_tiles"] == doc["progress"]["total_tiles"]
    _wait_for(lambda: model_replicas() == 1, 90, "scaling back to 1 model replica when idle")


def test_a_killed_model_replica_loses_no_tile(service):
    """Every model replica is killed mid-analysis; Serve replaces them, chunks are retried (by Serve's
    router or the ingress) and the stitcher counts each chunk once."""
    import ray

    big = f"{service.slides}/big/slide_000.svs"
    analysis_id = service.post({"slide": big, "model": "seg"}).json()["id"]

    def progress() -> dict:
        return service.client.get(f"/v1/analyses/{analysis_id}").json()["progress"]

    _wait_for(lambda: progress()["done_tiles"] > 0, 120, "the first chunk")
    victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if "ModelServer" in a["name"]]
    for entry in victims:
        actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
        ray.kill(actor, no_restart=True)
    at_kill = progress()
    assert victims and 0 < at_kill["done_tiles"] < at_kill["total_tiles"], at_kill
    doc = service.wait(analysis_id)
    assert doc["status"] == "done", doc
    done = doc["progress"]
    assert done["done_tiles"] == done["total_tiles"] and done["chunks_done"] == done["chunks_total"]
    summary = service.client.get(doc["links"]["summary.json"]).json()
    assert summary["tiles"] == summary["tiles_done"] == done["total_tiles"]
    alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "ModelServer" in a["name"]}
    assert alive and not alive & {v["name"] for v in victims}


def test_an_analysis_whose_ingress_died_ends_failed_and_the_service_comes_back(service):
    """The ingress keeps running analyses in memory; if it dies, their stored status stops beating,
    is reported as failed (clients stop waiting), and Serve's new ingress takes new analyses."""
    import ray

    big = f"{service.slides}/big/slide_000.svs"
    analysis_id = service.post({"slide": big, "model": "seg"}).json()["id"]
    _wait_for(
        lambda: service.client.get(f"/v1/analyses/{analysis_id}").json()["status"] == "running", 60, "running"
    )
    (ingress,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Ingress" in a["name"]]
    ray.kill(ray.get_actor(ingress["name"], namespace=ingress["namespace"]), no_restart=True)

    def reported() -> dict | None:
        try:
            r = service.client.get(f"/v1/analyses/{analysis_id}", timeout=5)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    _wait_for(lambda: (reported() or {}).get("status") == "failed", 120, "the orphan reported as failed")
    assert "interrupted" in reported()["reason"]
    doc = service.wait(
        service.post({"slide": f"{service.slides}/slide_000.svs", "model": "seg"}).json()["id"]
    )
    assert doc["status"] == "done"
