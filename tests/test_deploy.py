"""Deployment files checked by real tools and against the code they deploy.

Dockerfile: hadolint, and consistency with pyproject, the CLI and Settings (no
container engine runs here, so the wheel its build stage makes is built and
imported instead). Kubernetes: kubernetes-validate schemas plus cross-references.
Prometheus: promtool (config, rules, rule unit tests, a real scrape) and a real
Prometheus scraping the server. Grafana: every panel query runs in that Prometheus.

promtool and prometheus come from Debian's `prometheus` package (.ci/run installs
it). Without them these tests skip locally and fail under CI=true.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from prometheus_client import start_http_server

from conftest import ServerThread, TrainedStore
from endcap.cli import build_parser
from endcap.client import Client, EndcapError, Filters
from endcap.v1 import recommender_pb2
from server.infra.settings import Settings

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "endcap.json"
IN_CI = os.environ.get("CI") == "true"
SERVICE_NAME = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
# Oldest Kubernetes with GA gRPC probes that we claim, and the newest schema we have.
K8S_VERSIONS = ("1.29.0", "1.37.0")

# Series and settings the deploy files may name before the server has them;
# add a name here (with the issue that brings it) and remove it when it lands.
# Anything else must exist today.
UPCOMING_METRICS: frozenset[str] = frozenset()


def require(tool: str) -> str:
    """Path of a CLI tool; skip without it locally, fail without it in CI."""
    found = shutil.which(tool) or shutil.which(tool, path=str(Path(sys.executable).parent))
    if found:
        return found
    message = (
        f"{tool} is not installed (Debian: apt-get install prometheus; "
        f"PyPI tools: pip install -e '.[dev]')"
    )
    if IN_CI:
        pytest.fail(f"{message}; CI must install it (.ci/run)")
    pytest.skip(message)


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120)


def poll(what: str, check: Callable[[], T | None], timeout_s: float = 60.0) -> T:
    """Call `check` until it returns a value (not None); fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except (OSError, ValueError, KeyError) as exc:
            if isinstance(exc, urllib.error.HTTPError):
                exc.close()  # a 503 while starting holds its socket until collected
            last_error, value = exc, None
        if value is not None:
            return value
        time.sleep(0.25)  # polling interval, not a wait for something to happen
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last_error})")


# --- Dockerfile ---------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (upper-case name, value), via dockerfile-parse."""
    from dockerfile_parse import DockerfileParser  # type: ignore[import-untyped]

    # "" holds what precedes the first FROM (global ARGs).
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = stages[""]
    for ins in DockerfileParser(str(ROOT / "Dockerfile")).structure:
        if ins["instruction"] == "FROM":
            name = ins["value"].split(" AS ")[-1].strip() if " AS " in ins["value"] else ""
            current = stages.setdefault(name, [])
        if ins["instruction"] != "COMMENT":
            current.append((ins["instruction"], ins["value"]))
    return stages


def instructions(stage: str, kind: str) -> list[str]:
    return [value for ins, value in dockerfile_stages()[stage] if ins == kind]


def exec_form(value: str) -> list[str]:
    form = json.loads(value)
    assert isinstance(form, list), f"use the exec (JSON) form, got {value}"
    return [str(v) for v in form]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_hadolint_accepts_the_dockerfile() -> None:
    hadolint = require("hadolint")
    result = run(hadolint, "--no-color", "--config", ".hadolint.yaml", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_serve_and_train_targets_with_serve_default() -> None:
    stages = dockerfile_stages()
    assert {"base", "build", "serve", "train"} <= set(stages)
    assert list(stages)[-1] == "serve", "a plain `docker build .` must make the slim image"


def test_serve_image_installs_the_serve_extra_and_no_torch() -> None:
    project = pyproject()["project"]
    base = [Requirement(r).name for r in project["dependencies"]]
    serve = [Requirement(r).name for r in project["optional-dependencies"]["serve"]]
    assert "torch" not in base + serve
    (install,) = instructions("serve", "RUN")
    assert "[serve]" in install and "torch" not in install
    assert not any("torch" in v for _, v in dockerfile_stages()["base"])


def test_train_image_pins_the_torch_the_train_extra_accepts() -> None:
    (install,) = instructions("train", "RUN")
    assert "[train]" in install
    (pin,) = re.findall(r"torch==([\w.+]+)", install)
    (spec,) = [
        Requirement(r)
        for r in pyproject()["project"]["optional-dependencies"]["train"]
        if Requirement(r).name == "torch"
    ]
    assert Version(pin) in spec.specifier
    assert f"torch=={pin}" in (ROOT / "Makefile").read_text(), "Makefile and Dockerfile differ"


def test_build_stage_copies_everything_the_wheel_needs() -> None:
    sources: set[str] = set()
    for value in instructions("build", "COPY"):
        *srcs, _dest = value.split()
        sources.update(s.rstrip("/") for s in srcs if not s.startswith("--"))
    tool = pyproject()["tool"]["setuptools"]
    package_dirs = {
        (tool["package-dir"].get(pkg) or pkg.replace(".", "/")).split("/")[0]
        for pkg in tool["packages"]
    }
    needed = package_dirs | {"pyproject.toml", pyproject()["project"]["readme"]}
    assert needed <= sources, f"build stage misses {sorted(needed - sources)}"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such path"
    ignored = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()
    }
    assert not (sources & ignored), ".dockerignore hides a COPY source"


def test_entrypoint_commands_and_health_check_exist() -> None:
    scripts = pyproject()["project"]["scripts"]
    parser = build_parser()
    for stage in ("serve", "train"):
        (entry,) = instructions(stage, "ENTRYPOINT")
        (cmd,) = instructions(stage, "CMD")
        program, *args = exec_form(entry) + exec_form(cmd)
        assert program in scripts
        parser.parse_args(args)  # exits (SystemExit) on an unknown subcommand or flag
    (check,) = instructions("serve", "HEALTHCHECK")
    program, *args = exec_form(check.split("CMD", 1)[1].strip())
    assert program in scripts
    parsed = parser.parse_args(args)
    assert parsed.command == "health" and parsed.service == SERVICE_NAME
    serve_env = dockerfile_env("serve")
    assert parsed.target.rsplit(":", 1)[1] == serve_env["ENDCAP_PORT"]


def dockerfile_env(stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in instructions(stage, "ENV"):
        env.update(pair.split("=", 1) for pair in value.split())  # type: ignore[misc]
    return env


def test_serve_env_and_ports_match_settings() -> None:
    env = {k: v for k, v in dockerfile_env("serve").items() if k.startswith("ENDCAP_")}
    settings = Settings.from_env(env)
    defaults = Settings()
    assert settings.host == "0.0.0.0"
    assert (settings.port, settings.metrics_port) == (defaults.port, defaults.metrics_port)
    (exposed,) = instructions("serve", "EXPOSE")
    assert {int(p) for p in exposed.split()} == {settings.port, settings.metrics_port}
    assert f'"{settings.artifacts}"' in instructions("serve", "VOLUME")[0]


def test_images_run_as_the_numeric_non_root_user() -> None:
    (create,) = instructions("base", "RUN")
    uid = re.search(r"--uid (\d+)", create)
    gid = re.search(r"--gid (\d+)", create)
    assert uid and gid and int(uid[1]) > 0
    for stage in ("serve", "train"):
        assert instructions(stage, "USER") == [f"{uid[1]}:{gid[1]}"]


def test_base_image_python_satisfies_requires_python() -> None:
    (arg,) = [v for ins, v in dockerfile_stages()[""] if ins == "ARG"]
    match = re.search(r"python:(\d+\.\d+)", arg)
    assert match, arg
    assert (
        Version(match[1]) in Requirement(f"x{pyproject()['project']['requires-python']}").specifier
    )


def test_wheel_from_the_build_stage_serves_without_torch(tmp_path: Path) -> None:
    """Replays the build stage (same COPYs, same `pip wheel`) and imports the result."""
    context = tmp_path / "context"
    context.mkdir()
    for value in instructions("build", "COPY"):
        *srcs, dest = value.split()
        for src in srcs:
            target = context / dest / (Path(src).name if dest.endswith("/") else "")
            if (ROOT / src).is_dir():
                shutil.copytree(
                    ROOT / src,
                    target,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"),
                )
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / src, target)
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "--wheel-dir", str(wheels), "."],
        cwd=context, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = wheels.glob("endcap-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        zf.extractall(tmp_path / "site")
    for required in (
        "endcap/cli.py",
        "endcap/client.py",
        "endcap/py.typed",
        "endcap/v1/recommender_pb2.py",
        "endcap/v1/recommender_pb2_grpc.py",
        "server/app.py",
    ):
        assert required in names, f"{required} missing from the wheel"
    assert "endcap = endcap.cli:main" in entry_points
    unconditional = [
        Requirement(line.split(":", 1)[1].strip())
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert "torch" not in {r.name for r in unconditional}
    # Import the serving path from the wheel alone, as in the serve image: every
    # installed distribution outside the closure of the wheel's unconditional
    # requirements (torch, the dev tools, ...) is made unimportable.
    own = {Path(n).parts[0] for n in names if "/" in n and ".dist-info" not in n}
    installed = requirement_closure(unconditional)
    blocked = sorted(
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if not set(dists) & installed and module not in own
    )
    assert "torch" in blocked
    probe = (
        "import json, sys, importlib.abc\n"
        f"BLOCKED = set({json.dumps(blocked)})\n"
        "class NotInServeImage(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is not in the serve image')\n"
        "sys.meta_path.insert(0, NotInServeImage())\n"
        "import endcap, endcap.cli, endcap.client, server.app\n"
        "import grpc_health.v1.health_pb2_grpc  # `endcap health`, the HEALTHCHECK\n"
        f"assert endcap.cli.__file__.startswith({str(tmp_path / 'site')!r}), endcap.cli.__file__\n"
        "endcap.cli.build_parser().parse_args(['serve'])\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def requirement_closure(requirements: list[Requirement]) -> set[str]:
    """Distribution names (canonical) that installing `requirements` brings in."""
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        todo.extend(Requirement(r) for r in importlib.metadata.requires(req.name) or [])
    # packages_distributions() reports names as installed; compare both spellings.
    return seen | {
        dist.metadata["Name"]
        for dist in importlib.metadata.distributions()
        if canonicalize_name(dist.metadata["Name"]) in seen
    }


# --- Kubernetes ---------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_objects() -> list[dict[str, Any]]:
    return [
        doc
        for path in manifest_files()
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


def k8s(kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in k8s_objects():
        if obj["kind"] == "Deployment":
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]
        elif obj["kind"] == "CronJob":
            yield obj["metadata"]["name"], obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def container(name: str) -> dict[str, Any]:
    containers = k8s("Deployment", "endcap")["spec"]["template"]["spec"]["containers"]
    (found,) = [c for c in containers if c["name"] == name]
    return dict(found)


def server_container() -> dict[str, Any]:
    return container("endcap")


def front_container() -> dict[str, Any]:
    return container("front")


def configmap_env() -> dict[str, str]:
    return {k: str(v) for k, v in k8s("ConfigMap", "endcap-config")["data"].items()}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path: Path, version: str) -> None:
    from kubernetes_validate import utils as kv  # type: ignore[import-untyped]

    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.name} is empty"
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {where}: {exc}")


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files()]


def test_probes_call_the_grpc_health_service_on_the_serving_port() -> None:
    container = server_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    settings = Settings.from_env(configmap_env())
    assert ports == {"direct": settings.port, "metrics": settings.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": settings.port, "service": SERVICE_NAME}


def test_the_front_sheds_exactly_the_servers_read_methods() -> None:
    """The template names the read methods itself (nginx cannot ask the server): it
    must list the ones the server treats as reads, no more, no fewer."""
    from benchmarks.servers import FRONT_TEMPLATE
    from server.transport.auth import METHOD_ROLES

    (listed,) = re.findall(r"Recommender/\(([A-Za-z|]+)\)\$", FRONT_TEMPLATE.read_text())
    assert set(listed.split("|")) == {m for m, role in METHOD_ROLES.items() if role == "read"}


def test_the_front_listens_where_clients_dial_and_forwards_to_endcap() -> None:
    """The headless Service hands clients pod IPs, so they reach the container port
    itself: the front must own 50051 and forward to endcap's own port; its ConfigMap
    is the template the bench and tests run; it drains after endcap does."""
    from benchmarks.servers import FRONT_TEMPLATE, render_front

    front = front_container()
    env = {e["name"]: e["value"] for e in front["env"]}
    (port,) = front["ports"]
    assert port["name"] == "grpc" and port["containerPort"] == 50051
    settings = Settings.from_env(configmap_env())
    assert env["ENDCAP_FRONT_LISTEN"] == f"0.0.0.0:{port['containerPort']}"
    assert env["ENDCAP_UPSTREAM"] == f"127.0.0.1:{settings.port}"
    assert 1 <= int(env["ENDCAP_FRONT_MAX_IN_FLIGHT"]) <= 8
    rendered = render_front(env)
    assert (
        "${" not in rendered
        and f"limit_conn endcap_reads {env['ENDCAP_FRONT_MAX_IN_FLIGHT']};" in rendered
    )
    configmap = k8s("ConfigMap", "endcap-front")["data"]
    assert configmap == {FRONT_TEMPLATE.name: FRONT_TEMPLATE.read_text()}
    mounts = {m["name"]: m["mountPath"] for m in front["volumeMounts"]}
    spec = k8s("Deployment", "endcap")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v.get("configMap", {}).get("name") == "endcap-front"]
    assert mounts[volume["name"]] == "/etc/nginx/templates"
    endcap_stop = float(server_container()["lifecycle"]["preStop"]["exec"]["command"][1])
    front_stop = float(front["lifecycle"]["preStop"]["exec"]["command"][1])
    assert endcap_stop + settings.grace_s < front_stop < spec["terminationGracePeriodSeconds"]


def test_configmap_is_valid_settings() -> None:
    env = configmap_env()
    fields = {f"ENDCAP_{name.upper()}" for name in Settings.__dataclass_fields__}
    unknown = set(env) - fields
    assert not unknown, f"ConfigMap sets variables Settings does not read: {sorted(unknown)}"
    settings = Settings.from_env(env)  # raises SettingsError naming a bad value
    assert settings.host == "0.0.0.0"
    mounts = {m["name"]: m["mountPath"] for m in server_container()["volumeMounts"]}
    assert str(settings.artifacts) == mounts["artifacts"]


def test_the_api_key_secret_is_the_key_file_the_server_reads(tmp_path: Path) -> None:
    """Pods listen beyond loopback, so auth must be on: the ConfigMap's key file path
    is where the Deployment mounts the Secret, and the Secret parses as a key file
    that grants every role."""
    from server.transport.auth import ROLES, ApiKeys

    secret = k8s("Secret", "endcap-api-keys")
    (filename,) = secret["stringData"]
    spec = k8s("Deployment", "endcap")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "endcap-api-keys"
    (mount,) = [m for m in server_container()["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    settings = Settings.from_env(configmap_env())
    assert settings.api_keys_file == f"{mount['mountPath']}/{filename}"
    path = tmp_path / filename
    path.write_text(secret["stringData"][filename])
    keys = ApiKeys.load(path)
    assert set(ROLES) == {role for _, roles in keys.entries for role in roles}


def test_references_between_objects_resolve() -> None:
    names = {(o["kind"], o["metadata"]["name"]) for o in k8s_objects()}
    for owner, spec in pod_specs():
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in names, owner
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in names, owner
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in names, owner
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names, owner
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in source:
                        assert (kind, source[key]["name"]) in names, owner
    hpa = k8s("HorizontalPodAutoscaler", "endcap")["spec"]["scaleTargetRef"]
    assert (hpa["kind"], hpa["name"]) in names


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_pick_the_intended_pods() -> None:
    pods = {
        o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
        for o in k8s_objects()
        if o["kind"] == "Deployment"
    }
    for obj in k8s_objects():
        if obj["kind"] == "Deployment":
            selector = obj["spec"]["selector"]["matchLabels"]
            assert selects(selector, pods[obj["metadata"]["name"]])
    expected = {
        ("Service", "endcap"): "endcap",
        ("Service", "endcap-metrics"): "endcap",
        ("PodDisruptionBudget", "endcap"): "endcap",
        ("Service", "endcap-redis"): "endcap-redis",
        ("NetworkPolicy", "endcap-redis"): "endcap-redis",
    }
    for (kind, name), deployment in expected.items():
        spec = k8s(kind, name)["spec"]
        selector = spec.get("selector") or spec["podSelector"]
        selector = selector.get("matchLabels", selector)
        chosen = {d for d, labels in pods.items() if selects(selector, labels)}
        assert chosen == {deployment}, f"{kind}/{name} selects {chosen}"
    (allowed,) = k8s("NetworkPolicy", "endcap-redis")["spec"]["ingress"][0]["from"]
    assert selects(allowed["podSelector"]["matchLabels"], pods["endcap"])


def test_services_are_headless_and_target_named_ports() -> None:
    ports = {p["name"] for p in server_container()["ports"] + front_container()["ports"]}
    grpc_service = k8s("Service", "endcap")["spec"]
    metrics_service = k8s("Service", "endcap-metrics")["spec"]
    assert grpc_service["clusterIP"] == "None"  # client-side round_robin over pod IPs
    assert metrics_service["clusterIP"] == "None" and metrics_service["publishNotReadyAddresses"]
    assert [p["targetPort"] for p in grpc_service["ports"]] == ["grpc"]
    assert [p["targetPort"] for p in metrics_service["ports"]] == ["metrics"]
    assert {p["targetPort"] for p in grpc_service["ports"] + metrics_service["ports"]} <= ports


def test_servers_share_state_and_reload_new_models() -> None:
    settings = Settings.from_env(configmap_env())
    assert settings.state_backend == "redis"
    service, port = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", settings.redis_url).groups()  # type: ignore[union-attr]
    assert k8s("Service", service)["spec"]["ports"][0]["port"] == int(port)
    assert settings.reload_poll_s > 0, "servers must watch LATEST for the training CronJob"


def test_termination_grace_covers_prestop_and_drain() -> None:
    spec = k8s("Deployment", "endcap")["spec"]["template"]["spec"]
    pre_stop = server_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = Settings.from_env(configmap_env()).grace_s
    assert spec["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain


def test_pods_are_locked_down_and_sized() -> None:
    for owner, spec in pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True, owner
        assert spec["automountServiceAccountToken"] is False, owner
        for container in spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, owner
            assert ctx["readOnlyRootFilesystem"] is True, owner
            assert ctx["capabilities"]["drop"] == ["ALL"], owner
            for key in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][key]), (owner, key)


def test_endcap_pods_use_the_dockerfile_targets_and_user() -> None:
    (create,) = instructions("base", "RUN")
    uid = re.search(r"--uid (\d+)", create)
    assert uid
    images = {}
    for owner, spec in pod_specs():
        for container in spec["containers"]:
            name, _, tag = container["image"].partition(":")
            if name == "endcap":
                images[owner] = tag
                assert spec["securityContext"]["runAsUser"] == int(uid[1]), owner
    assert images == {"endcap": "serve", "endcap-train": "train"}
    assert {"serve", "train"} <= set(dockerfile_stages())
    assert server_container()["args"] == exec_form(instructions("serve", "CMD")[0])


def test_training_cronjob_writes_where_servers_read() -> None:
    cron = k8s("CronJob", "endcap-train")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    spec = cron["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "train"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert str(args.out) == mounts["artifacts"]["mountPath"] == configmap_env()["ENDCAP_ARTIFACTS"]
    assert not mounts["artifacts"].get("readOnly", False)
    served = {m["name"]: m for m in server_container()["volumeMounts"]}
    assert served["artifacts"]["readOnly"] is True
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for _, s in pod_specs()
        for v in s["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"artifacts": "endcap-artifacts"}
    assert k8s("PersistentVolumeClaim", "endcap-artifacts")["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]


def test_readme_service_config_is_the_clients() -> None:
    from endcap.client import service_config

    text = (DEPLOY / "README.md").read_text()
    (block,) = re.findall(r"```json\n(.*?)```", text, flags=re.S)
    assert json.loads(block) == service_config(timeout_s=1.0, load_balancing="round_robin")
    assert "dns:///endcap.endcap.svc.cluster.local:50051" in text


# --- Prometheus: static checks --------------------------------------------------------

RULE_FILES = ("endcap.rules.yml", "endcap.alerts.yml")


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-local.yml"])
def test_promtool_checks_the_config(config: str) -> None:
    promtool = require("promtool")
    result = run(promtool, "check", "config", str(PROM / config))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_rules() -> None:
    promtool = require("promtool")
    result = run(promtool, "check", "rules", *(str(PROM / f) for f in RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    promtool = require("promtool")
    tests = sorted(str(p) for p in (PROM / "tests").glob("*.test.yml"))
    assert tests
    result = run(promtool, "test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_and_docs() -> None:
    alerts = {
        r["alert"]: r
        for g in yaml.safe_load((PROM / "endcap.alerts.yml").read_text())["groups"]
        for r in g["rules"]
    }
    tested = "".join(p.read_text() for p in (PROM / "tests").glob("*.test.yml"))
    for name, rule in alerts.items():
        assert f"alertname: {name}" in tested, f"{name} has no promtool unit test"
        assert rule["labels"]["severity"] in {"page", "ticket"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_scrape_config_finds_the_metrics_service() -> None:
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    (name,) = sd["names"]
    service, namespace, *_ = name.split(".")
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert namespace == kustomization["namespace"]
    assert k8s("Service", service)["spec"]["ports"][0]["port"] == sd["port"]
    assert sd["port"] == Settings.from_env(configmap_env()).metrics_port
    assert config["rule_files"] == list(RULE_FILES)
    assert yaml.safe_load((PROM / "prometheus-local.yml").read_text())["rule_files"] == list(
        RULE_FILES
    )


# --- Grafana: static checks -------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query, template variables included."""
    out = [(p["title"], t["expr"]) for p in dashboard_panels() for t in p["targets"]]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            inner = re.fullmatch(r"label_values\((.+), *\w+\)", var["definition"])
            assert inner, var["definition"]
            out.append((f"variable {var['name']}", inner[1]))
    return out


def instantiate(expr: str) -> str:
    """Grafana's variables as Grafana would fill them, with every pod selected."""
    for var, value in (
        ("$__rate_interval", "1m"),
        ("$__interval", "15s"),
        ("$__range", "1h"),
        ("$job", ".*"),
        ("$instance", ".*"),
    ):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown variable in {expr}"
    return expr


def test_dashboard_is_well_formed() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    kinds = {p["type"] for p in dash["panels"]}
    assert kinds <= {"row", "timeseries", "stat", "table"}
    cells: dict[tuple[int, int], str] = {}
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip()
            instantiate(target["expr"])


def test_dashboard_covers_the_issue() -> None:
    exprs = " ".join(e for _, e in dashboard_exprs())
    for needle in (
        "histogram_quantile(0.99, sum by (method, le) (rate(endcap_grpc_handling_seconds_bucket",
        "sum by (method) (rate(endcap_grpc_requests_total",
        'code!="OK"',
        "endcap_items_served_total",
        'endcap_experiment_events_total{job=~"$job", instance=~"$instance", type="click"}',
        "endcap_event_lag_seconds_bucket",
        "endcap_catalog_items",
        "endcap_model_info",
        "endcap_model_created_timestamp_seconds",
    ):
        assert needle in exprs, f"dashboard has no panel on {needle}"


# --- Live: a real scrape, promtool check metrics, and a real Prometheus ---------------------


@pytest.fixture(scope="module")
def metrics_url(server: ServerThread, trained: TrainedStore) -> Iterator[str]:
    """The server's /metrics, after every RPC and an error have been recorded."""
    http, thread = start_http_server(0, addr="127.0.0.1", registry=server.running.metrics.registry)
    items = [str(i) for i in trained.dataset.item_ids[:20]]
    with Client(server.target) as client:
        client.recommend(country="DE", num_results=5)
        client.recommend(user_id=str(trained.dataset.user_ids[0]), num_results=5)
        client.similar_items(items[:2], num_results=5)
        client.rerank(items, filters=Filters(in_stock_only=False))
        with pytest.raises(EndcapError):
            client.recommend(num_results=9999)
    yield f"http://127.0.0.1:{http.server_port}/metrics"
    http.shutdown()
    http.server_close()
    thread.join(timeout=5)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text: str = reply.read().decode()
    return text


def exposed_names(text: str) -> set[str]:
    return {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("endcap_")
    }


def test_promtool_check_metrics_on_a_real_scrape(metrics_url: str) -> None:
    promtool = require("promtool")
    text = scrape(metrics_url)
    assert "endcap_grpc_handling_seconds_bucket" in text
    result = run(promtool, "check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip() and not result.stderr.strip(), result.stdout + result.stderr


def metric_names(expr: str) -> set[str]:
    # Identifiers that name endcap series or recording rules; labels and
    # functions never start with "endcap".
    return set(re.findall(r"\bendcap[_:][a-z0-9_:]*", expr))


def declared_names(server: ServerThread) -> set[str]:
    """Every sample name the server's registry can expose, observed yet or not."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "info": ("_info",),
        "summary": ("", "_count", "_sum", "_created"),
    }
    return {
        family.name + suffix
        for family in server.running.metrics.registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def test_deploy_files_name_only_real_or_upcoming_series(
    metrics_url: str, server: ServerThread
) -> None:
    exposed = exposed_names(scrape(metrics_url)) | declared_names(server)
    recorded = {
        r["record"]
        for g in yaml.safe_load((PROM / "endcap.rules.yml").read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    }
    assert UPCOMING_METRICS.isdisjoint(exposed), "an upcoming series exists now: move it"
    known = exposed | recorded | UPCOMING_METRICS
    used: dict[str, str] = {}
    for source, expr in dashboard_exprs():
        used.update(dict.fromkeys(metric_names(expr), f"dashboard: {source}"))
    for path in [PROM / f for f in RULE_FILES]:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                used.update(dict.fromkeys(metric_names(rule["expr"]), f"{path.name}"))
                used.pop(rule.get("record", ""), None)
    unknown = {name: where for name, where in used.items() if name not in known}
    assert not unknown, f"unknown series: {unknown}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def prom_api(base: str, path: str, **params: str) -> dict[str, Any]:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            body: dict[str, Any] = json.loads(reply.read())
    except urllib.error.HTTPError as exc:  # 400/422 carry the parse or eval error
        with exc:
            body = json.loads(exc.read())
    return body


@pytest.fixture(scope="module")
def prometheus(metrics_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus on loopback scraping the server every second, with our rules."""
    binary = require("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    rule_paths = []
    for name in RULE_FILES:
        rules = yaml.safe_load((PROM / name).read_text())
        for group in rules["groups"]:
            group["interval"] = "1s"  # evaluate within the test, not every 30 s
        (work / name).write_text(yaml.safe_dump(rules))
        rule_paths.append(str(work / name))
    config = yaml.safe_load((PROM / "prometheus-local.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = rule_paths
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [metrics_url.split("/")[2]]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))

    port = free_port()
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool | None:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited: {(work / 'prometheus.log').read_text()}")
            with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as reply:
                return True if reply.status == 200 else None

        poll("Prometheus to start", ready)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def query(base: str, expr: str) -> list[dict[str, Any]]:
    body = prom_api(base, "/api/v1/query", query=expr)
    assert body["status"] == "success", f"{expr}: {body.get('error')}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_prometheus_scrapes_the_server(prometheus: str, server: ServerThread) -> None:
    result = poll(
        "endcap_catalog_items in Prometheus",
        lambda: query(prometheus, "endcap_catalog_items") or None,
    )
    engine = server.running.holder.current
    assert engine is not None
    assert float(result[0]["value"][1]) == len(engine.catalog)
    (target,) = prom_api(prometheus, "/api/v1/targets")["data"]["activeTargets"]
    assert target["health"] == "up" and target["labels"]["job"] == "endcap"


def test_rules_load_and_evaluate_cleanly(prometheus: str) -> None:
    expected = sum(
        len(g["rules"])
        for name in RULE_FILES
        for g in yaml.safe_load((PROM / name).read_text())["groups"]
    )

    def evaluated() -> list[dict[str, Any]] | None:
        groups = prom_api(prometheus, "/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if len(rules) != expected or any(r["lastEvaluation"].startswith("0001") for r in rules):
            return None
        return rules

    rules = poll("every rule to be evaluated", evaluated)
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not broken, broken


def test_recording_rules_produce_series(prometheus: str) -> None:
    for record in ("endcap:grpc_requests:rate5m", "endcap:model_age_seconds"):
        result = poll(f"{record} to be recorded", lambda r=record: query(prometheus, r) or None)  # type: ignore[misc]
        assert result[0]["metric"]["job"] == "endcap"
    age = float(query(prometheus, "endcap:model_age_seconds")[0]["value"][1])
    assert 0 <= age < 86400  # the test artifact was built minutes ago


@pytest.mark.parametrize(("source", "expr"), dashboard_exprs(), ids=lambda v: str(v)[:60])
def test_dashboard_query_runs_in_prometheus(prometheus: str, source: str, expr: str) -> None:
    query(prometheus, instantiate(expr))


def test_dashboard_shows_live_data(prometheus: str) -> None:
    poll(
        "a per-method request rate",
        lambda: (
            query(
                prometheus,
                instantiate(
                    'sum by (method) (rate(endcap_grpc_requests_total{job=~"$job"}[$__rate_interval]))'
                ),
            )
            or None
        ),
    )
    versions = query(prometheus, "max by (instance, model_version) (endcap_model_info)")
    assert versions and versions[0]["metric"]["model_version"]
