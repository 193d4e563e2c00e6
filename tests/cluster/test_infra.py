"""infra/: the cluster-launcher YAMLs pass Ray's own validation (schema and defaults fill-out, no cloud calls), and the
KubeRay manifests, Dockerfile, configs and CLI agree with each other."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.cli import _parser
from cluster.config import load_config
from tests.conftest import REPO

INFRA = REPO / "infra"
DOCKERFILE = (INFRA / "docker" / "Dockerfile").read_text()
IMAGE = re.search(r"-t (\S+) \.", DOCKERFILE).group(1)  # the tag the Dockerfile's build command gives


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_cluster_launcher_yaml_passes_ray_validation(cloud: str) -> None:
    raw = yaml.safe_load((INFRA / cloud / "cluster.yaml").read_text())
    config = prepare_config(raw)  # merges Ray's defaults for the provider, checks docker and node types
    validate_config(config)  # Ray's JSON schema
    assert config["provider"]["type"] == cloud and config["docker"]["image"] == IMAGE
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # nothing runs on the head
    gpu_types = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert len(gpu_types) >= 2 and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_types.values())
    assert config["max_workers"] >= sum(t["max_workers"] for t in gpu_types.values())
    text = (INFRA / cloud / "cluster.yaml").read_text()
    assert not re.search(r"(aws_secret_access_key|AKIA[0-9A-Z]{16}|private_key|BEGIN [A-Z ]*PRIVATE KEY)", text)
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "RAY_AUTH_MODE=token" in start
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert config["initialization_commands"] == [] and "/mnt/raygpt" not in str(config["docker"])  # no NFS needed
    [spot] = [t["node_config"] for name, t in gpu_types.items() if "spot" in name]  # for elastic runs
    assert spot.get("InstanceMarketOptions", {}).get("MarketType") == "spot" or \
        spot.get("scheduling", [{}])[0].get("provisioningModel") == "SPOT"


def test_cluster_yaml_with_a_typo_is_rejected() -> None:
    raw = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    raw["max_wrokers"] = 3
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(prepare_config(raw))


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests(name: str) -> None:
    manifest = yaml.safe_load((INFRA / "kuberay" / name).read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    spec = manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
    assert manifest["kind"] in ("RayCluster", "RayJob")
    assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"]["mode"] == "token"
    import ray

    assert spec["rayVersion"] == ray.__version__
    assert {c["image"] for c in _containers(spec)} == {IMAGE}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    pods = [spec["headGroupSpec"]["template"]["spec"], *[g["template"]["spec"] for g in spec["workerGroupSpecs"]]]
    assert all(p["serviceAccountName"] == "raygpt" for p in pods)  # bucket access by workload identity
    assert not [v for p in pods for v in p.get("volumes", []) if "persistentVolumeClaim" in v]  # no shared volume
    for gpu in spec["workerGroupSpecs"]:
        assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
        assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    if manifest["kind"] == "RayCluster":  # a spot group for elastic runs: scheduled only on spot nodes
        [spot] = [g for g in spec["workerGroupSpecs"] if g["groupName"].endswith("-spot")]
        pod = spot["template"]["spec"]
        assert pod["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
        assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"} in pod["tolerations"]
    if manifest["kind"] == "RayJob":
        argv = shlex.split(manifest["spec"]["entrypoint"])
        assert argv[0] == "raygpt" and manifest["spec"]["shutdownAfterJobFinishes"] is True
        args = _parser().parse_args(argv[1:])  # a real subcommand of our CLI
        assert args.command == "run" and (REPO / args.config).is_file()


def test_dockerfile_builds_what_the_cluster_runs() -> None:
    assert "torch==2.13.0" in DOCKERFILE and "deepspeed==0.19.8" in DOCKERFILE
    assert "--no-build-isolation" in DOCKERFILE and "DS_BUILD_FUSED_ADAM=1" in DOCKERFILE
    assert "-c constraints.txt -e ." in DOCKERFILE and "lm_eval_plugin install" in DOCKERFILE
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'raygpt = "cluster.cli:main"' in pyproject  # the console script the entrypoints call


def test_cloud_config_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAYGPT_RUN_ROOT", raising=False)
    cfg = load_config(REPO / "configs" / "cloud_gpu.yaml")
    assert cfg.cluster.use_gpu and cfg.cluster.num_workers == 16 and cfg.train.precision == "auto"  # bf16 on the H100s
    assert cfg.run_dir.startswith("s3://") and cfg.cluster.storage_path is None  # everything in the bucket
    assert cfg.layout.remote and cfg.layout.storage == cfg.run_dir
    assert not cfg.eval.local_data and not cfg.eval.allow_code_execution  # hub datasets; no code execution
    assert cfg.run_dir.rsplit("/", 1)[1] == cfg.name
