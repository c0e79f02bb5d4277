"""infra/: KubeRay manifests validate against the CRD schemas (unknown fields rejected), versions match."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
CRDS = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
MANIFESTS = sorted((INFRA / "kuberay").glob("*.yaml"))


def strict(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever the API server would prune fields.

    The CRDs never forbid unknown fields; Kubernetes prunes them silently (or rejects them under
    strict field validation), so a misspelt key would be lost without a word. Objects that list
    ``properties`` and neither set ``additionalProperties`` nor preserve unknown fields get it.
    """
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.cache
def crd_schema(kind: str, version: str) -> dict[str, Any]:
    crd = yaml.safe_load((SCHEMAS / CRDS[kind]).read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return strict(v["schema"]["openAPIV3Schema"])
    raise KeyError(f"{CRDS[kind]} has no version {version}")


def validate(doc: dict[str, Any]) -> list[str]:
    """Every schema error of a KubeRay document, as 'path: message'."""
    group, version = doc["apiVersion"].split("/")
    assert group == "ray.io", doc["apiVersion"]
    validator = jsonschema.Draft4Validator(crd_schema(doc["kind"], version))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def kuberay_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") in CRDS]


def cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]
    found = (spec, spec.get("rayClusterSpec"), spec.get("rayClusterConfig"))
    return [s for s in found if s and "headGroupSpec" in s]


def images(spec: dict[str, Any]) -> list[str]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]


def test_every_kind_has_a_manifest():
    kinds = {d["kind"] for p in MANIFESTS for d in kuberay_docs(p)}
    assert kinds == set(CRDS), kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_its_crd(path):
    docs = kuberay_docs(path)
    assert docs, f"{path.name} holds no KubeRay document"
    for doc in docs:
        assert validate(doc) == [], f"{path.name}: {validate(doc)}"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_ray_version_and_image_tags_match_the_installed_ray(path):
    for doc in kuberay_docs(path):
        for spec in cluster_specs(doc):
            assert spec["rayVersion"] == ray.__version__
            for image in images(spec):
                assert f"ray{ray.__version__}-py311" in image.rsplit(":", 1)[1], image


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_worker_groups_autoscale_within_bounds(path):
    for doc in kuberay_docs(path):
        for spec in cluster_specs(doc):
            assert spec.get("enableInTreeAutoscaling") is True
            groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
            assert {"cpu-readers", "gpu"} <= set(groups)
            for g in groups.values():
                assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
            gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(gpu["nvidia.com/gpu"]) >= 1


def test_the_strict_schema_catches_a_misspelt_field_and_a_wrong_type():
    doc = kuberay_docs(INFRA / "kuberay" / "ray-cluster.pathray.yaml")[0]
    typo = copy.deepcopy(doc)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e for e in validate(typo))
    wrong = copy.deepcopy(doc)
    wrong["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("not of type 'integer'" in e for e in validate(wrong))


def test_the_shipped_kuberay_samples_still_validate():
    """The strict schema is not stricter than KubeRay itself: its own samples pass."""
    samples = sorted((SCHEMAS / "samples").glob("*.yaml"))
    assert samples
    for path in samples:
        for doc in kuberay_docs(path):
            assert validate(doc) == [], f"{path.name}: {validate(doc)}"


def test_dockerfile_base_image_matches_the_installed_ray():
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M)
    assert base and base.group(1) == f"rayproject/ray:{ray.__version__}-py311-gpu"
    pins = dict(re.findall(r"^(torch|torchvision)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M))
    assert f'"torch=={pins["torch"]}"' in text and f'"torchvision=={pins["torchvision"]}"' in text


def test_aws_cluster_launcher_config_validates_against_rays_schema():
    """As written (Ray's schema forbids unknown keys), and after ``ray up`` fills in its defaults."""
    import json

    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))
    typo = copy.deepcopy(config)
    typo["available_node_types"]["gpu"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(typo, schema)
    assert config["docker"]["image"].endswith(f"ray{ray.__version__}-py311-gpu")
    assert set(config["available_node_types"]) == {"head", "cpu_readers", "gpu"}


def test_ray_service_builds_pathrays_app_with_valid_args():
    """serveConfigV2 imports our builder, and its args pass the builder's own typed config."""
    from pathray.serving.app import load_app_config

    doc = kuberay_docs(INFRA / "kuberay" / "ray-service.serve.yaml")[0]
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "pathray.serving.app:build_app"
    cfg = load_app_config(app["args"])
    assert cfg.serve.model.num_gpus == 1
    assert 1 <= cfg.serve.model.autoscaling.min_replicas < cfg.serve.model.autoscaling.max_replicas
    assert all(p.startswith("s3://") for p in cfg.serve.security.allowed_prefixes)
    groups = {g["groupName"]: g for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert groups["gpu"]["maxReplicas"] >= cfg.serve.model.autoscaling.max_replicas
