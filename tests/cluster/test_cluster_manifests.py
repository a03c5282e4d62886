"""KubeRay manifests and the cluster-launcher YAML parse and carry what each needs; kubectl
accepts the manifests (client-side dry run against a stub discovery server, no real cluster)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from core.config import load_config
from pipelines.config import GenerateConfig

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "cluster" / "k8s"
MANIFESTS = [K8S / "raycluster.yaml", K8S / "rayjob.yaml"]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _containers(spec: dict) -> list[dict]:
    return spec["template"]["spec"]["containers"]


def _cluster_specs() -> list[dict]:
    out = []
    for path in MANIFESTS:
        for doc in _docs(path):
            if doc["kind"] == "RayCluster":
                out.append(doc["spec"])
            elif doc["kind"] == "RayJob":
                out.append(doc["spec"]["rayClusterSpec"])
    return out


@pytest.mark.parametrize("path", [*MANIFESTS, ROOT / "cluster" / "aws.yaml"], ids=lambda p: p.name)
def test_each_file_starts_with_the_command_that_uses_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("kubectl apply -f" in first or "ray up" in first)


def test_ray_cluster_specs_have_images_gpus_bounds_and_the_model_cache():
    specs = _cluster_specs()
    assert len(specs) == 2
    claims = {d["metadata"]["name"] for d in _docs(K8S / "raycluster.yaml") if d["kind"] == "PersistentVolumeClaim"}
    for spec in specs:
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {"gpu", "cpu"}
        for group in [head, *groups.values()]:
            for c in _containers(group):
                assert c["image"] and ":" in c["image"] and not c["image"].endswith(":latest")
            for vol in group["template"]["spec"].get("volumes", []):
                if "persistentVolumeClaim" in vol:
                    assert vol["persistentVolumeClaim"]["claimName"] in claims
        for group in groups.values():
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        gpu = _containers(groups["gpu"])[0]
        assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert gpu["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert "nvidia.com/gpu" not in _containers(groups["cpu"])[0]["resources"]["limits"]
        hf_home = {e["name"]: e["value"] for e in gpu["env"]}["HF_HOME"]
        mounts = {m["name"]: m["mountPath"] for m in gpu["volumeMounts"]}
        assert hf_home.startswith(mounts["model-cache"] + "/")
        volumes = {v["name"]: v for v in groups["gpu"]["template"]["spec"]["volumes"]}
        assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "segfactory-model-cache"
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    cluster = next(s for s in specs if "enableInTreeAutoscaling" in s)
    gpu_group = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert cluster["enableInTreeAutoscaling"] and gpu_group["minReplicas"] < gpu_group["maxReplicas"]


def test_rayjob_entrypoint_is_a_valid_generate_command():
    job = next(d for d in _docs(K8S / "rayjob.yaml") if d["kind"] == "RayJob")["spec"]
    args = shlex.split(job["entrypoint"])
    assert args[:4] == ["segfactory", "generate", "--config", "pipelines/configs/seggen-sdxl.yaml"]
    cfg = load_config(GenerateConfig, ROOT / args[3], args[4:])  # every override is a real key
    assert cfg.preset == "sdxl" and cfg.source.format == "ade20k"
    assert cfg.output.path.startswith("s3://") and cfg.source.path.startswith("s3://")  # object storage by default
    assert cfg.output.writers > 1
    assert cfg.mask2img.resources.num_gpus == 1
    gpu = next(g for g in job["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    pools = sum(s.resources.max_actors * s.resources.num_gpus for s in (cfg.text2mask, cfg.mask2img))
    assert gpu["maxReplicas"] >= pools  # room for every actor of both pools
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["HF_HOME"].startswith("/models/")
    assert job["shutdownAfterJobFinishes"] is True


def test_cluster_launcher_yaml_is_valid_for_ray():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    validate_config(fillout_defaults(config))  # Ray's own schema
    types = config["available_node_types"]
    assert config["head_node_type"] in types and types[config["head_node_type"]]["resources"]["CPU"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["min_workers"] < t["max_workers"] for t in gpu)
    assert config["docker"]["image"].startswith("rayproject/ray:")
    assert ".venv" in config["rsync_exclude"]


class _Discovery(BaseHTTPRequestHandler):
    """Just enough of a Kubernetes API server for `kubectl apply --dry-run=client`: discovery of
    the kinds we use (v1 PVCs, ray.io/v1 RayCluster/RayJob) and 404 for every object."""

    RESOURCES = {"/api/v1": ("v1", [("persistentvolumeclaims", "PersistentVolumeClaim")]),
                 "/apis/ray.io/v1": ("ray.io/v1", [("rayclusters", "RayCluster"), ("rayjobs", "RayJob")])}

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?")[0]
        if path == "/api":
            return self._send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        if path == "/apis":
            gv = {"groupVersion": "ray.io/v1", "version": "v1"}
            return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": "ray.io", "versions": [gv], "preferredVersion": gv}]})
        if path in self.RESOURCES:
            gv, kinds = self.RESOURCES[path]
            return self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": [
                {"name": n, "singularName": "", "namespaced": True, "kind": k, "verbs": ["get", "create", "patch"]}
                for n, k in kinds]})
        return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                "reason": "NotFound", "code": 404})


@pytest.mark.subprocess
def test_kubectl_client_dry_run_accepts_the_manifests(tmp_path):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    kubeconfig = tmp_path / "kubeconfig"  # empty: no real cluster is ever contacted
    kubeconfig.write_text("")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Discovery)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cmd = ["kubectl", f"--kubeconfig={kubeconfig}", f"--server=http://127.0.0.1:{server.server_address[1]}",
               "apply", "--dry-run=client", "--validate=false"] + [a for m in MANIFESTS for a in ("-f", str(m))]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == sorted([
        "persistentvolumeclaim/segfactory-model-cache created (dry run)",
        "persistentvolumeclaim/segfactory-data created (dry run)",
        "raycluster.ray.io/segfactory created (dry run)",
        "rayjob.ray.io/seggen-ade20k created (dry run)"])


def test_clusters_use_token_auth_and_the_rayjob_never_retries_exit_2_or_3():
    specs = _cluster_specs()
    assert len(specs) == 2 and all(spec["authOptions"] == {"mode": "token"} for spec in specs)
    job = next(d for d in _docs(K8S / "rayjob.yaml") if d["kind"] == "RayJob")
    assert job["spec"]["backoffLimit"] == 0  # a retry cannot fix a bad config (2) or bad data (3)
