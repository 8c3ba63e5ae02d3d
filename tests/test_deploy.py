"""The deployment files under ``deploy/`` agree with the code: every config file loads, the
example documents every setting, the compose file, Kubernetes manifests, systemd units and
Dockerfile have the expected shape, and every CLI command and option they use exists.

Fast and offline: no Docker, no cluster, no services.
"""

from __future__ import annotations

import configparser
import dataclasses
import fnmatch
import json
import re
import shlex
import tempfile
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from replicator.cli import main
from replicator.config import Config, DestinationSettings, load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
EXAMPLE = DEPLOY / "replicator.example.toml"
CONTAINER_TOML = DEPLOY / "replicator.container.toml"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_TOML = DEPLOY / "compose" / "replicator.toml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"

#: every ``replicator`` subcommand the deployment files may run
DEPLOY_COMMANDS = {"run", "topics", "mirror", "follow", "demo", "verify", "drill"}

_HEADER = re.compile(r"^\s*#?\s*(\[\[?)([a-z_]+)\]\]?\s*$")


# ---------------------------------------------------------------- helpers


def _sections(text: str) -> dict[str, str]:
    """TOML text -> {section name: its lines}, counting commented headers
    (``# [[destinations]]``) as headers too."""
    out: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            current = m.group(2)
            out.setdefault(current, [])
            continue
        out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def _mentions(block: str, key: str) -> bool:
    return re.search(rf"^\s*#?\s*{re.escape(key)}\s*=", block, re.MULTILINE) is not None


def _settings_classes() -> dict[str, type[Any]]:
    """Section name -> settings dataclass, from ``Config`` itself (so a new section or
    setting is covered without touching this test)."""
    cfg = Config()
    out: dict[str, type[Any]] = {}
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if f.name == "destinations":
            out[f.name] = DestinationSettings
        else:
            assert dataclasses.is_dataclass(value), f"Config.{f.name} is not a settings class"
            out[f.name] = type(value)
    return out


def _load_text(text: str) -> Config:
    """``load_config`` of TOML text (written to a temporary file), no environment."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "replicator.toml"
        path.write_text(text)
        return load_config(path, env={})


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _k8s_objects() -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        objs.extend(_yaml_docs(path))
    return objs


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _docker(instr: str) -> list[str]:
    return [args for word, args in _dockerfile() if word == instr]


def _compose() -> dict[str, Any]:
    with COMPOSE.open() as f:
        doc: dict[str, Any] = yaml.safe_load(f)
    return doc


def _uses_our_image(service: dict[str, Any]) -> bool:
    build = service.get("build")
    return isinstance(build, dict) and build.get("dockerfile") == "deploy/Dockerfile"


def _cli_usages() -> list[tuple[str, list[str]]]:
    """Every replicator command line in the deployment files: (where, argv after the
    program name)."""
    usages: list[tuple[str, list[str]]] = []
    cmd = json.loads(_docker("CMD")[-1])
    usages.append(("Dockerfile CMD", cmd))
    for name, svc in _compose()["services"].items():
        if _uses_our_image(svc):
            usages.append((f"compose {name}", [str(a) for a in svc.get("command", cmd)]))
    for obj in _k8s_objects():
        if obj["kind"] not in ("StatefulSet", "CronJob", "Deployment", "Job"):
            continue
        for c in _pod_spec(obj)["containers"]:
            if c["image"].split(":")[0].endswith("replicator"):
                usages.append((f"k8s {obj['kind']} {obj['metadata']['name']}", c["args"]))
    for path in sorted(SYSTEMD.glob("*.service")):
        argv = shlex.split(_unit(path)["Service"]["ExecStart"])
        assert argv[0].endswith("/replicator"), f"{path.name}: ExecStart runs {argv[0]}"
        usages.append((f"systemd {path.name}", argv[1:]))
    return usages


def _split_argv(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """-> (global options, subcommand, its arguments)."""
    i = 0
    while i < len(argv) and argv[i].startswith("--"):
        i += 1 if "=" in argv[i] or argv[i] == "--version" else 2
    return argv[:i], argv[i], argv[i + 1 :]


def _option_names(command: click.Command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


# ---------------------------------------------------------------- the example config


def test_example_config_loads_as_the_defaults() -> None:
    assert load_config(EXAMPLE, env={}) == Config()


def test_example_config_documents_every_setting() -> None:
    blocks = _sections(EXAMPLE.read_text())
    missing: list[str] = []
    for section, cls in _settings_classes().items():
        if section not in blocks:
            missing.append(f"[{section}]")
            continue
        missing.extend(
            f"{section}.{f.name}"
            for f in dataclasses.fields(cls)
            if not _mentions(blocks[section], f.name)
        )
    assert not missing, f"settings not documented in {EXAMPLE.name}: {missing}"


def test_example_config_commented_settings_are_valid() -> None:
    """Uncommenting every ``# key = value`` example (and ``# [[destinations]]``) still
    gives a valid configuration, and changes only the settings that are unset by default."""
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        if re.match(r"^# (\[\[[a-z]+\]\]$|[a-z_]+ = )", line):
            line = line[2:]
        lines.append(line)
    cfg = _load_text("\n".join(lines) + "\n")
    assert cfg.destinations == (DestinationSettings(
        name="dr", url="s3://backups/replicator?endpoint=https://s3.example.net&region=eu-west-1",
        required=False),)
    assert cfg.ingest.schemas_dir == Path("/opt/replicator/schemas")
    assert cfg.server.tokens_file == Path("/etc/replicator/admin-tokens")
    assert cfg.encryption.key_file == Path("/etc/replicator/data-keys")
    defaults = Config()
    assert dataclasses.replace(
        cfg, destinations=(), ingest=defaults.ingest, server=defaults.server,
        encryption=defaults.encryption) == defaults


def test_example_config_names_the_secret_environment_variables() -> None:
    text = EXAMPLE.read_text()
    for var in ("REPLICATOR_ADMIN_TOKENS", Config().encryption.key_env, "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "REPLICATOR_<SECTION>_<KEY>"):
        assert var in text, var


def test_container_config_loads() -> None:
    cfg = load_config(CONTAINER_TOML, env={})
    assert cfg.ingest.data_dir == Path("/var/lib/replicator")
    assert cfg.server.host == "0.0.0.0"


# ---------------------------------------------------------------- docker compose


def test_compose_config_loads() -> None:
    cfg = load_config(COMPOSE_TOML, env={})
    assert cfg.store_url.startswith("s3://replicator/")
    assert "endpoint=http://s3:7070" in cfg.store_url
    assert cfg.kafka.bootstrap_servers == "kafka:9092"
    assert cfg.server.host == "0.0.0.0"
    assert cfg.ingest.data_dir == Path("/var/lib/replicator")
    assert [d.name for d in cfg.destinations] == ["local"]


def test_compose_file_has_the_stack() -> None:
    doc = _compose()
    services = doc["services"]
    assert {"kafka", "postgres", "s3", "replicator"} <= set(services)
    rep = services["replicator"]
    assert _uses_our_image(rep)
    assert (COMPOSE.parent / rep["build"]["context"] / rep["build"]["dockerfile"]).resolve() \
        == DOCKERFILE.resolve()
    deps = rep["depends_on"]
    for name in ("kafka", "postgres", "s3"):
        assert deps[name]["condition"] == "service_healthy", name
        assert "test" in services[name]["healthcheck"], f"{name} needs a healthcheck"
    for name, dep in deps.items():
        assert name in services
        if dep["condition"] == "service_completed_successfully":
            assert services[name].get("restart") == "no", name
    mounts = {m.split(":")[1]: m.split(":")[0] for m in rep["volumes"]}
    assert (COMPOSE.parent / mounts["/etc/replicator/replicator.toml"]).resolve() \
        == COMPOSE_TOML.resolve()
    cfg = load_config(COMPOSE_TOML, env={})
    assert str(cfg.ingest.data_dir) in mounts, "the data dir is a volume"
    assert rep["stop_grace_period"], "a clean stop needs time"
    env = rep["environment"]
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "REPLICATOR_ADMIN_TOKENS",
                cfg.encryption.key_env):
        assert var in env, var
    for name, svc in services.items():
        if _uses_our_image(svc):
            assert svc["image"] == rep["image"], name


def test_compose_kafka_is_kraft_and_reachable_from_the_replicator() -> None:
    env = _compose()["services"]["kafka"]["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"]
    assert "broker" in env["KAFKA_PROCESS_ROLES"]
    advertised = env["KAFKA_ADVERTISED_LISTENERS"]
    bootstrap = load_config(COMPOSE_TOML, env={}).kafka.bootstrap_servers
    assert f"//{bootstrap}" in advertised


def test_compose_bucket_job_creates_the_configured_store() -> None:
    cmd = [str(a) for a in _compose()["services"]["create-bucket"]["command"]]
    assert cmd[0] == "mirror" and "--create-bucket" in cmd
    assert cmd[cmd.index("--to") + 1] == load_config(COMPOSE_TOML, env={}).store_url
    s3_env = _compose()["services"]["s3"]["environment"]
    rep_env = _compose()["services"]["replicator"]["environment"]
    assert s3_env["ROOT_ACCESS_KEY"] == rep_env["AWS_ACCESS_KEY_ID"]
    assert s3_env["ROOT_SECRET_KEY"] == rep_env["AWS_SECRET_ACCESS_KEY"]


# ---------------------------------------------------------------- kubernetes


def test_k8s_manifests_have_the_expected_kinds() -> None:
    objs = _k8s_objects()
    for obj in objs:
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name")
        assert "namespace" not in obj["metadata"], "manifests stay namespace-agnostic"
    kinds = sorted(o["kind"] for o in objs)
    for kind in ("ConfigMap", "Secret", "Service", "StatefulSet"):
        assert kind in kinds, kind
    assert kinds.count("CronJob") == 2


def test_k8s_configmap_config_loads() -> None:
    (cm,) = [o for o in _k8s_objects() if o["kind"] == "ConfigMap"]
    cfg = _load_text(cm["data"]["replicator.toml"])
    assert cfg.server.host == "0.0.0.0"
    assert cfg.ingest.data_dir == Path("/var/lib/replicator")
    assert not cfg.drill.enabled, "drills run as a CronJob, not inside the service as well"


def test_k8s_statefulset() -> None:
    objs = _k8s_objects()
    (sts,) = [o for o in objs if o["kind"] == "StatefulSet"]
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap"]
    cfg = _load_text(cm["data"]["replicator.toml"])
    assert sts["spec"]["replicas"] == 1
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    pod = _pod_spec(sts)
    (c,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts[str(cfg.ingest.data_dir)] in claims, "the spool lives on the claim"
    assert c["args"][:1] == ["run"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports[c["livenessProbe"]["httpGet"]["port"]] == cfg.server.port
    assert c["resources"]["requests"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["terminationGracePeriodSeconds"] >= 60
    secrets = {o["metadata"]["name"] for o in objs if o["kind"] == "Secret"}
    assert {e["secretRef"]["name"] for e in c["envFrom"]} <= secrets
    headless = [o for o in objs if o["kind"] == "Service"
                and o["metadata"]["name"] == sts["spec"]["serviceName"]]
    assert headless and headless[0]["spec"]["clusterIP"] == "None"


def test_k8s_service_selects_the_service_pods() -> None:
    objs = _k8s_objects()
    (sts,) = [o for o in objs if o["kind"] == "StatefulSet"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for svc in (o for o in objs if o["kind"] == "Service"):
        assert svc["spec"]["selector"].items() <= labels.items()
        assert [p["port"] for p in svc["spec"]["ports"]] == [9187]


def test_k8s_cronjobs_run_verify_and_drill() -> None:
    objs = _k8s_objects()
    (sts,) = [o for o in objs if o["kind"] == "StatefulSet"]
    sts_c = _pod_spec(sts)["containers"][0]
    claims = {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"}
    commands: dict[str, list[str]] = {}
    for job in (o for o in objs if o["kind"] == "CronJob"):
        pod = _pod_spec(job)
        (c,) = pod["containers"]
        commands[c["args"][0]] = c["args"]
        assert c["image"] == sts_c["image"]
        assert c["envFrom"] == sts_c["envFrom"]
        assert c["env"] == sts_c["env"]
        assert job["spec"]["concurrencyPolicy"] == "Forbid"
        assert pod["restartPolicy"] == "Never"
        assert pod["securityContext"]["runAsNonRoot"] is True
        # the same ConfigMap, and a persistent data dir (verify state, drill reports)
        vols = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert vols[mounts["/etc/replicator"]]["configMap"]["name"] == "replicator-config"
        data = vols[mounts["/var/lib/replicator"]]
        assert data["persistentVolumeClaim"]["claimName"] in claims
    assert set(commands) == {"verify", "drill"}
    assert all("--json" in argv for argv in commands.values())


def test_k8s_secret_is_a_template() -> None:
    (secret,) = [o for o in _k8s_objects() if o["kind"] == "Secret"]
    values = secret["stringData"]
    assert {"REPLICATOR_ADMIN_TOKENS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            Config().encryption.key_env} <= set(values)
    for key, value in values.items():
        assert "REPLACE-ME" in value, f"{key}: only placeholders belong in the repository"


def test_k8s_kustomization_lists_every_manifest() -> None:
    (kust,) = _yaml_docs(K8S / "kustomization.yaml")
    resources = kust["resources"]
    for name in resources:
        assert (K8S / name).is_file(), name
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == manifests


# ---------------------------------------------------------------- systemd


def test_systemd_service_unit() -> None:
    unit = _unit(SYSTEMD / "replicator.service")
    svc = unit["Service"]
    argv = shlex.split(svc["ExecStart"])
    glob, command, _ = _split_argv(argv[1:])
    assert command == "run"
    assert "--no-progress" in argv
    assert glob[:2] == ["--config", "/etc/replicator/replicator.toml"]
    assert svc["Type"] == "simple"
    assert svc["User"] == "replicator"
    assert svc["Restart"] == "on-failure"
    assert svc["EnvironmentFile"].lstrip("-") == "/etc/replicator/env"
    assert int(svc["TimeoutStopSec"]) >= 60
    assert svc["ProtectSystem"] == "strict"
    assert "/var/lib/replicator" in svc["ReadWritePaths"].split()
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert svc[key] == "yes", key
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_timers_start_existing_units() -> None:
    timers = sorted(SYSTEMD.glob("*.timer"))
    assert {t.stem for t in timers} == {"replicator-verify", "replicator-drill"}
    for timer in timers:
        t = _unit(timer)["Timer"]
        assert t["OnCalendar"]
        target = SYSTEMD / t.get("Unit", f"{timer.stem}.service")
        svc = _unit(target)["Service"]
        assert svc["Type"] == "oneshot"
        _, command, rest = _split_argv(shlex.split(svc["ExecStart"])[1:])
        assert command == timer.stem.removeprefix("replicator-")
        assert "--json" in rest


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile() -> None:
    froms = _docker("FROM")
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms)
    user = _docker("USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    assert json.loads(_docker("ENTRYPOINT")[-1]) == ["replicator"]
    cmd = json.loads(_docker("CMD")[-1])
    assert cmd[0] == "run" and "--no-progress" in cmd
    container = load_config(CONTAINER_TOML, env={})
    volumes = json.loads(_docker("VOLUME")[-1])
    assert str(container.ingest.data_dir) in volumes
    assert str(container.server.port) in _docker("EXPOSE")[-1].split()
    assert "/healthz" in _docker("HEALTHCHECK")[-1]
    env = " ".join(_docker("ENV"))
    schemas = re.search(r"REPLICATOR_INGEST_SCHEMAS_DIR=(\S+)", env)
    assert schemas, "a pip-installed package has no schemas/ beside it"
    copies = [a.split() for a in _docker("COPY")]
    assert ["schemas", schemas.group(1)] in copies


def test_dockerfile_sources_are_in_the_build_context() -> None:
    patterns = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    for must in (".git", ".venv", "var"):
        assert must in patterns, must
    sources = [
        src for args in _docker("COPY") if not args.startswith("--")
        for src in args.split()[:-1]
    ]
    assert {"pyproject.toml", "README.md", "replicator", "schemas"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), src
        parts = src.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        for pat in patterns:
            hit = [p for p in prefixes if fnmatch.fnmatch(p, pat.removeprefix("**/"))]
            assert not hit, f".dockerignore {pat!r} excludes {src}"


# ---------------------------------------------------------------- CLI commands used


def test_deploy_files_use_known_commands() -> None:
    usages = _cli_usages()
    used = {_split_argv(argv)[1] for _, argv in usages}
    assert used <= DEPLOY_COMMANDS, used - DEPLOY_COMMANDS
    assert {"run", "verify", "drill"} <= used


@pytest.mark.parametrize(
    "where, argv", [pytest.param(where, argv, id=where) for where, argv in _cli_usages()]
)
def test_deploy_command_lines_parse(where: str, argv: list[str]) -> None:
    glob, name, rest = _split_argv(argv)
    for opt in glob:
        if opt.startswith("--"):
            assert opt.split("=")[0] in _option_names(main), f"{where}: {opt}"
    assert isinstance(main, click.Group)
    command = main.commands.get(name)
    assert command is not None, f"{where}: `replicator {name}` does not exist"
    options = _option_names(command)
    for arg in rest:
        if arg.startswith("--"):
            assert arg.split("=")[0] in options, f"{where}: `replicator {name} {arg}`"
    result = CliRunner().invoke(main, [name, "--help"], env={"REPLICATOR_CONFIG": None})
    assert result.exit_code == 0, result.output
