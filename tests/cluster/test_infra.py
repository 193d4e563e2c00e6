"""infra/: the cluster-launcher YAMLs pass Ray's own validation (schema and defaults fill-out, no cloud calls), and the
KubeRay manifests, Dockerfile, configs and CLI agree with each other."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.cli import _parser
from cluster.config import load_config
from cluster.ray_connect import TASK_EVENTS_KEPT
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
    assert f"RAY_task_events_max_num_task_in_gcs={TASK_EVENTS_KEPT} " in start  # a bounded GCS on long runs
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
    [head] = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert {"name": "RAY_task_events_max_num_task_in_gcs", "value": str(TASK_EVENTS_KEPT)} in head["env"]
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


def test_aws_nodes_are_private_behind_our_security_group_with_imdsv2() -> None:
    from ray.autoscaler._private.aws.config import _configure_security_group

    config = prepare_config(yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text()))
    assert config["provider"]["use_internal_ips"] is True
    groups = set()
    for node_type in config["available_node_types"].values():
        node = node_type["node_config"]
        groups.update(node["SecurityGroupIds"])
        assert node["MetadataOptions"] == {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled"}
        assert "NetworkInterfaces" not in node  # (they would carry their own groups and public-IP setting)
    assert len(groups) == 1
    assert _configure_security_group(config) is config  # Ray creates no default group (its SSH rule is 0.0.0.0/0)


def test_gcp_nodes_are_private_on_the_raygpt_network() -> None:
    config = prepare_config(yaml.safe_load((INFRA / "gcp" / "cluster.yaml").read_text()))
    assert config["provider"]["use_internal_ips"] is True
    for node_type in config["available_node_types"].values():
        node = node_type["node_config"]
        [interface] = node["networkInterfaces"]
        assert interface["subnetwork"].endswith("/subnetworks/raygpt") and "accessConfigs" not in interface
        assert node["tags"] == {"items": ["raygpt"]}
        assert {"key": "disable-legacy-endpoints", "value": "TRUE"} in node["metadata"]["items"]
    # every node names its interfaces, so Ray's _configure_subnet adds none (its default has an external IP)


def _fake_cli(tmp: Path, name: str, output: str) -> dict[str, str]:
    """A stand-in for the cloud CLI on PATH (no cloud here) that records each call's argv and prints `output`."""
    log = tmp / f"{name}.log"
    script = tmp / "bin" / name
    script.parent.mkdir(exist_ok=True)
    script.write_text(f"#!/usr/bin/env python3\nimport json, sys\nopen({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                      f"print({output!r})\n")
    script.chmod(0o755)
    return {"PATH": f"{script.parent}:{os.environ['PATH']}", "LOG": str(log)}


def _calls(log: str) -> list[list[str]]:
    return [json.loads(line) for line in Path(log).read_text().splitlines()] if Path(log).exists() else []


@pytest.mark.parametrize(("script", "cli", "env"), [
    ("aws/security_group.sh", "aws", {"VPC_ID": "vpc-0abc"}),
    ("gcp/network.sh", "gcloud", {"PROJECT": "p-1"}),
])
def test_network_scripts_admit_only_the_cluster_and_one_ssh_cidr(tmp_path: Path, script: str, cli: str,
                                                                 env: dict[str, str]) -> None:
    fake = _fake_cli(tmp_path, cli, "sg-0fake")
    run = lambda extra: subprocess.run(["bash", str(INFRA / script)], env={**os.environ, **fake, **env, **extra},  # noqa: E731
                                       capture_output=True, text=True, timeout=30)
    for cidr in (None, "0.0.0.0/0", "10.0.0.0/4", "::/0", "not-a-cidr"):
        done = run({} if cidr is None else {"SSH_CIDR": cidr})
        assert done.returncode != 0 and "SSH_CIDR" in done.stderr and not _calls(fake["LOG"])  # nothing created
    assert run({"SSH_CIDR": "203.0.113.7/32"}).returncode == 0
    calls = [" ".join(c) for c in _calls(fake["LOG"])]
    sources = [c for c in calls if "ingress" in c or "firewall-rules create" in c]
    if cli == "aws":
        assert any("create-security-group" in c and "--vpc-id vpc-0abc" in c for c in calls)
        assert len(sources) == 2
        assert "IpProtocol=-1,UserIdGroupPairs=[{GroupId=sg-0fake}]" in sources[0]  # the cluster itself
        assert "FromPort=22,ToPort=22,IpRanges=[{CidrIp=203.0.113.7/32" in sources[1]
    else:
        assert any("networks create raygpt --subnet-mode=custom" in c for c in calls)
        assert len(sources) == 2 and all("--direction=INGRESS" in c and "--target-tags=raygpt" in c for c in sources)
        assert "--source-tags=raygpt" in sources[0] and "--rules=tcp:22 --source-ranges=203.0.113.7/32" in sources[1]
    assert "0.0.0.0/0" not in " ".join(calls)


def test_dockerfile_is_pinned_and_runs_unprivileged() -> None:
    [base] = re.findall(r"^FROM (\S+)", DOCKERFILE, flags=re.M)
    assert re.fullmatch(r"nvidia/cuda:[\w.-]+@sha256:[0-9a-f]{64}", base)  # by digest, not by a movable tag
    assert not re.search(r"\bppa\b|add-apt-repository|sources\.list", DOCKERFILE, flags=re.I)  # no third-party apt
    users = re.findall(r"^USER (\S+)", DOCKERFILE, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")  # the image's last USER is not root
    assert "bubblewrap" in DOCKERFILE  # the code sandbox's backend
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {"runs/", ".git/", ".venv/", ".env", "**/credentials", "**/*.pem", "**/auth_token"} <= ignored


def _pods(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"], *[g["template"] for g in spec["workerGroupSpecs"]]]


@pytest.mark.parametrize(("name", "instance"), [("raycluster.yaml", "raygpt"), ("rayjob.yaml", "raygpt-run")])
def test_kuberay_pods_are_locked_down(name: str, instance: str) -> None:
    manifest = yaml.safe_load((INFRA / "kuberay" / name).read_text())
    spec = manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    for template in _pods(spec):
        pod = template["spec"]
        assert template["metadata"]["labels"]["app.kubernetes.io/instance"] == instance
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        writable = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
            assert context["readOnlyRootFilesystem"] is True
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts["/tmp"] in writable and mounts["/home/ray"] in writable  # Ray's session dir, caches
    [policy] = [p for p in yaml.safe_load_all((INFRA / "kuberay" / "networkpolicy.yaml").read_text())
                if p["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/instance": instance}]
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    own, operator = policy["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": instance}}}]}
    assert operator["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
    assert {p["port"] for p in operator["ports"]} == {8265, 6379}


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
