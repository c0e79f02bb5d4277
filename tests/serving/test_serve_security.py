"""Request checks as pure functions (no Ray): slide URIs, tokens, ids, and the shipped serve configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from pathray.serving.security import (
    UriRejected,
    check_slide_uri,
    is_safe_id,
    normalise_prefix,
    token_matches,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PREFIXES = [
    normalise_prefix(p)
    for p in ("file:///data/slides", "s3://slides/cohort-a/", "http://127.0.0.1:9000/wsi/")
]


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("file:///data/slides/a.svs", "/data/slides/a.svs"),
        ("/data/slides/sub/a.svs", "/data/slides/sub/a.svs"),
        ("file://localhost/data/slides/a.svs", "/data/slides/a.svs"),
        ("file:///data/slides/a%20b.svs", "/data/slides/a b.svs"),
        ("s3://slides/cohort-a/x/1.svs", "s3://slides/cohort-a/x/1.svs"),
        ("S3://slides/cohort-a/1.svs", "s3://slides/cohort-a/1.svs"),
        ("http://127.0.0.1:9000/wsi/1.tiff", "http://127.0.0.1:9000/wsi/1.tiff"),
    ],
)
def test_allowed_uris_pass_and_come_back_decoded(uri, expected):
    assert check_slide_uri(uri, PREFIXES, resolve_links=False) == expected


@pytest.mark.parametrize(
    "uri, status, words",
    [
        ("file:///etc/passwd", 403, "not under an allowed prefix"),
        ("/etc/passwd", 403, "not under an allowed prefix"),
        ("file:///data/slides/../../etc/passwd", 403, "'..'"),
        ("file:///data/slides/./a.svs", 403, "'..'"),
        ("file:///data/slides/%2e%2e/%2e%2e/etc/passwd", 403, "'..'"),
        ("file:///data/slides/%2E%2E/secret.svs", 403, "'..'"),
        ("file:///data/slides2/a.svs", 403, "not under an allowed prefix"),
        ("file:///data/slides", 403, "not under an allowed prefix"),
        ("file://evil.example/data/slides/a.svs", 403, "must not name a host"),
        ("s3://other-bucket/cohort-a/a.svs", 403, "'other-bucket' is not allowed"),
        ("s3://slides/cohort-b/a.svs", 403, "not under an allowed prefix"),
        ("s3://slides/cohort-a-evil/a.svs", 403, "not under an allowed prefix"),
        ("s3://user:pw@slides/cohort-a/a.svs", 403, "credentials"),
        ("gs://slides/cohort-a/a.svs", 403, "scheme 'gs' is not allowed"),
        ("ftp://127.0.0.1/wsi/a.svs", 403, "scheme 'ftp' is not allowed"),
        ("http://169.254.169.254/latest/meta-data", 403, "'169.254.169.254' is not allowed"),
        ("http://127.0.0.1:9001/wsi/a.svs", 403, "is not allowed"),
        ("http://127.0.0.1:9000@evil.example/wsi/a.svs", 403, "credentials"),
        ("", 422, "empty"),
        ("   ", 422, "empty"),
        ("slides/a.svs", 422, "not a URI"),
        ("s3:/slides/cohort-a/a.svs", 422, "not a URI"),
        ("file:///data/slides/a.svs?version=2", 422, "query"),
        ("file:///data/slides/a.svs#x", 422, "fragments"),
        ("file:///data/slides/a\x00.svs", 422, "control"),
        ("file:///data/slides/a%00.svs", 422, "control"),
        ("file:///data/slides\\..\\..\\etc\\passwd", 422, "backslashes"),
        ("file:///data/slides/%252e%252e/a.svs", 422, "doubly"),
        ("file:///data/slides//a.svs", 422, "empty path segments"),
        (" file:///data/slides/a.svs", 422, "outer spaces"),
        ("file:///data/slides/" + "a" * 3000, 422, "longer than"),
        ("s3:///cohort-a/a.svs", 422, "needs a bucket"),
    ],
)
def test_rejected_uris_say_why(uri, status, words):
    with pytest.raises(UriRejected) as info:
        check_slide_uri(uri, PREFIXES, resolve_links=False)
    assert info.value.status == status
    assert words in info.value.reason


def test_nothing_allowed_when_no_prefixes():
    with pytest.raises(UriRejected) as info:
        check_slide_uri("file:///data/slides/a.svs", [])
    assert info.value.status == 403 and "allowed_prefixes is empty" in info.value.reason


def test_symlinks_are_resolved_before_the_prefix_check(tmp_path):
    allowed, outside = tmp_path / "slides", tmp_path / "private"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.svs").write_bytes(b"secret")
    (allowed / "ok.svs").write_bytes(b"slide")
    (allowed / "escape.svs").symlink_to(outside / "secret.svs")
    (allowed / "sub" / "dir-escape").symlink_to(outside, target_is_directory=True)
    (allowed / "alias.svs").symlink_to(allowed / "ok.svs")
    prefixes = [normalise_prefix(f"file://{allowed}")]

    assert check_slide_uri(f"file://{allowed}/ok.svs", prefixes) == os.path.realpath(allowed / "ok.svs")
    assert check_slide_uri(f"{allowed}/alias.svs", prefixes) == os.path.realpath(allowed / "ok.svs")
    for uri in (f"file://{allowed}/escape.svs", f"file://{allowed}/sub/dir-escape/secret.svs"):
        with pytest.raises(UriRejected) as info:
            check_slide_uri(uri, prefixes)
        assert info.value.status == 403 and "through a link" in info.value.reason


def test_a_linked_allowed_folder_still_works(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.svs").write_bytes(b"x")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    prefixes = [normalise_prefix(f"file://{tmp_path}/link/")]
    assert check_slide_uri(f"file://{tmp_path}/link/a.svs", prefixes) == os.path.realpath(real / "a.svs")


def test_prefixes_are_normalised_and_bad_ones_refused():
    assert normalise_prefix("/data/slides") == "file:///data/slides/"
    assert normalise_prefix("S3://Slides/a") == "s3://slides/a/"
    for bad in ("slides/", "s3://", "ftp://h/x/", "file:///data/../etc/"):
        with pytest.raises((ValueError, UriRejected)):
            normalise_prefix(bad)


def test_bearer_tokens_compare_exactly():
    assert token_matches("Bearer s3cret", "s3cret")
    assert token_matches("bearer s3cret", "s3cret")
    for header in (None, "", "s3cret", "Basic s3cret", "Bearer s3cre", "Bearer s3cret2", "Bearer  "):
        assert not token_matches(header, "s3cret")


def test_ids_are_plain_names():
    assert is_safe_id("gleason-v1.2_cnn") and is_safe_id("a" * 128)
    for bad in ("", ".", "..", "../x", "a/b", ".hidden", "a b", "a" * 129, "é"):
        assert not is_safe_id(bad)


def test_shipped_serve_configs_load_and_build(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from pathray.serving.app import build_app, load_app_config

    monkeypatch.delenv("PATHRAY_SERVE_TOKEN", raising=False)
    cfg = load_app_config({"config": str(CONFIGS / "serve.yaml")})
    assert cfg.serve.http.host == "127.0.0.1"
    assert cfg.serve.model.autoscaling.max_replicas >= cfg.serve.model.autoscaling.min_replicas
    assert cfg.serve.security.allowed_prefixes and cfg.serve.security.resolved_token() is None
    build_app(cfg)

    deploy = yaml.safe_load((CONFIGS / "serve-app.yaml").read_text())
    ServeDeploySchema.model_validate(deploy)
    (entry,) = deploy["applications"]
    assert entry["import_path"] == "pathray.serving.app:build_app"
    build_app(entry["args"])


def test_app_args_overrides_and_token(monkeypatch):
    from pathray.section import ConfigError
    from pathray.serving.app import load_app_config

    cfg = load_app_config(
        {
            "config": str(CONFIGS / "serve.yaml"),
            "set": ["serve.http.port=8123"],
            "inference": {"chunk_tiles": 7},
        }
    )
    assert cfg.serve.http.port == 8123 and cfg.inference.chunk_tiles == 7
    monkeypatch.setenv("PATHRAY_SERVE_TOKEN", "from-env")
    assert cfg.serve.security.resolved_token() == "from-env"
    cfg = load_app_config({"serve": {"security": {"token": "from-config"}}, "set": ["serve.http.port=1"]})
    assert cfg.serve.security.resolved_token() == "from-config"
    assert "from-config" not in repr(cfg)
    with pytest.raises(ConfigError, match="serve.model.autoscaling"):
        load_app_config({"serve": {"model": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}})
    with pytest.raises(ConfigError, match="serve.nope"):
        load_app_config({"serve": {"nope": 1}})


def test_a_project_config_with_a_serve_section_can_be_served(tmp_path):
    from pathray.section import ConfigError
    from pathray.serving.app import load_app_config

    project = tmp_path / "project.yaml"
    project.write_text(
        "engine: {name: debug_cnn}\ntask: {name: segmentation}\n"
        "serve: {models: s3://b/models, http: {port: 8100}}\ninference: {chunk_tiles: 16}\n"
    )
    cfg = load_app_config({"config": str(project)})
    assert cfg.serve.models == "s3://b/models" and cfg.inference.chunk_tiles == 16
    project.write_text("engin: {name: debug_cnn}\n")
    with pytest.raises(ConfigError, match="engin: Extra inputs are not permitted"):
        load_app_config({"config": str(project)})


def test_the_token_is_not_an_app_argument_and_a_replica_without_one_refuses_to_start(monkeypatch):
    from pathray.serving.app import build_app, load_app_config
    from pathray.serving.ingress import Ingress

    monkeypatch.setenv("PATHRAY_SERVE_TOKEN", "driver-secret")
    app = build_app(load_app_config({"config": str(CONFIGS / "serve.yaml")}))
    args = app._bound_deployment.init_args  # what Serve stores with the application
    assert "driver-secret" not in repr(args) and args[-1] is True
    # a token given in the config is not stored with the app either: replicas read the environment
    from ray import cloudpickle  # how Serve stores an application's arguments

    inline = {"config": str(CONFIGS / "serve.yaml"), "serve": {"security": {"token": "config-secret"}}}
    stored = cloudpickle.dumps(build_app(load_app_config(inline))._bound_deployment.init_args)
    assert b"config-secret" not in stored and b"driver-secret" not in stored
    monkeypatch.delenv("PATHRAY_SERVE_TOKEN")  # a cluster whose environment lacks the token
    # Serve wraps our class in a subclass of the same name: ours is the last of that module
    ours = [c for c in Ingress.func_or_class.__mro__ if c.__module__ == "pathray.serving.ingress"][-1]
    with pytest.raises(RuntimeError, match=r"\$PATHRAY_SERVE_TOKEN"):
        ours.__init__(ours.__new__(ours), None, args[1], True)  # the replica's constructor
