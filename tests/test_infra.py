"""The deployment files in infra/ parse, carry what KubeRay needs, pin their images, and run real commands.

A manifest that names a flag the CLI does not have, or a file the image does not hold, only fails at
01:30 on a cluster; these tests make it fail here instead: every command is parsed with
``wbc_batch.cli.build_parser()``, every path a container runs is traced through the Dockerfile's
COPY lines back to a file of this repository, and the nightly submit script runs against a stub ``ray``.
"""

from __future__ import annotations

import configparser
import contextlib
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from datetime import datetime, timezone
from importlib import import_module
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from wbc_batch.cli import build_parser
from wbc_batch.errors import EXIT_LEASE_HELD

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
YAML_FILES = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
JSON_FILES = sorted(INFRA.rglob("*.json"))
SHELL_OPERATORS = {";", "&&", "||", "|", ">", ">>", "2>&1", "&"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _by_kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in YAML_FILES for d in _docs(p) if d.get("kind") == kind]


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted path, value) in a parsed document."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for p, v in _walk(doc) if isinstance(v, dict) and "image" in v and "name" in v and p.endswith("]")]


def _strings(node: Any, where: str) -> Iterator[tuple[str, str]]:
    """Each string of a document; a list of strings (a command vector) as one shell-joined string."""
    if isinstance(node, str):
        yield where, node
    elif isinstance(node, list) and node and all(isinstance(v, str) for v in node):
        yield where, shlex.join(node)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{where}[{i}]")
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{where}.{k}")


def _texts() -> Iterator[tuple[str, str]]:
    """(where, text) of every string and command vector in infra/ that may run a command."""
    for path in YAML_FILES:
        for doc in _docs(path):
            yield from _strings(doc, path.name)
    for path in sorted([*INFRA.rglob("*.sh"), *INFRA.rglob("*.cron"), *INFRA.rglob("*.service"), INFRA / "Dockerfile"]):
        text = path.read_text().replace("\\\n", " ").replace("%%", "%").replace("\\%", "%")
        for line in text.splitlines():
            if not line.lstrip().startswith("#"):
                yield path.name, line


def _commands(text: str) -> Iterator[tuple[str, list[str]]]:
    """(sub-command, arguments) of each ``wbc-batch SUB …`` / ``python jobs/SUB.py …`` in a shell text."""
    try:
        tokens = shlex.split(text)
    except ValueError:
        return
    for i, tok in enumerate(tokens):
        if " " in tok:  # a quoted script, e.g. bash -c '...'
            yield from _commands(tok)
            continue
        job = re.fullmatch(r"(?:.*/)?jobs/(\w+)\.py", tok)
        if job:
            sub, rest = job.group(1), tokens[i + 1 :]
        elif re.fullmatch(r"(?:\S*/bin/)?wbc-batch", tok) and i + 1 < len(tokens):
            sub, rest = tokens[i + 1], tokens[i + 2 :]
        else:
            continue
        args: list[str] = []
        for t in rest:
            if t in SHELL_OPERATORS or t.startswith((">", "2>")):
                break
            args.append(t)
        yield sub, args


def _all_commands() -> list[tuple[str, str, list[str]]]:
    return [(where, sub, args) for where, text in _texts() for sub, args in _commands(text)
            if "--help" not in args and "-h" not in args]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of infra/Dockerfile, continuation lines joined, comments left out."""
    lines = [ln for ln in (INFRA / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in text.splitlines() if ln.strip()]


def _docker_args() -> dict[str, str]:
    return dict(arg.split("=", 1) for op, arg in _dockerfile() if op == "ARG" and "=" in arg)


def _pip_specs() -> list[Requirement]:
    """The requirements the image's ``pip install`` lines pin, with ${ARG}s filled in."""
    args = _docker_args()
    out = []
    for op, arg in _dockerfile():
        for step in arg.split("&&") if op == "RUN" else []:
            if not step.strip().startswith("pip install"):
                continue
            for quoted in re.findall(r'"([^"]+)"', step):
                out.append(Requirement(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], quoted)))
    return out


def _image_files() -> dict[PurePosixPath, Path]:
    """Where each repository path lands in the image: image path -> repository path (COPY lines, WORKDIR)."""
    workdir, out = PurePosixPath("/"), {}
    for op, arg in _dockerfile():
        if op == "WORKDIR":
            workdir = workdir / arg
        elif op == "COPY":
            *sources, dest = [a for a in shlex.split(arg) if not a.startswith("--")]
            for src in sources:
                target = workdir / dest
                for path in REPO.glob(src.rstrip("*")) if src.endswith("*") else [REPO / src]:
                    out[target / path.name if dest.endswith("/") else target] = path
    return out


def _in_image(path: str, cwd: str = "/") -> Path | None:
    """The repository file that ends up at ``path`` (relative to ``cwd``) in the image, if any."""
    wanted = PurePosixPath(cwd) / path
    for image_path, repo_path in _image_files().items():
        if wanted == image_path or image_path in wanted.parents:
            found = repo_path / wanted.relative_to(image_path)
            return found if found.exists() else None
    return None


def _pinned(requirement: str) -> Any:
    """pyproject's specifier for a distribution name (extras ignored)."""
    by_name = {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    return by_name[Requirement(requirement).name].specifier


def _ray_version() -> str:
    """The Ray version of the image's base (rayproject/ray:<version>-...)."""
    [base] = [arg for op, arg in _dockerfile() if op == "FROM"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)(?:-\S+)?", base)
    assert m, f"the image must build on a rayproject/ray release, not {base}"
    return m.group(1)


def _ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every Ray cluster a manifest asks KubeRay for: RayCluster, RayJob and RayCronJob."""
    out = [(f"{p.name} RayCluster", d["spec"]) for p, d in _by_kind("RayCluster")]
    out += [(f"{p.name} RayJob", d["spec"]["rayClusterSpec"]) for p, d in _by_kind("RayJob")]
    out += [(f"{p.name} RayCronJob", d["spec"]["jobTemplate"]["rayClusterSpec"]) for p, d in _by_kind("RayCronJob")]
    return out


def test_every_manifest_parses() -> None:
    assert YAML_FILES and JSON_FILES
    for path in YAML_FILES:
        assert _docs(path), f"{path} holds no document"
    for path in JSON_FILES:
        json.loads(path.read_text())


def test_every_image_is_pinned() -> None:
    images = [(p.name, c["image"]) for p in YAML_FILES for d in _docs(p) for c in _containers(d)]
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    images += [("docker-compose.yml", s["image"]) for s in compose["services"].values() if "image" in s]
    froms = re.findall(r"^FROM\s+(\S+)", (INFRA / "Dockerfile").read_text(), flags=re.M)
    images += [("Dockerfile", f) for f in froms]
    assert len(images) >= 10
    for where, image in images:
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        assert name and tag and "/" not in tag, f"{where}: image {image} has no tag"
        assert tag != "latest" and not tag.endswith("-latest"), f"{where}: image {image} is not pinned"
    assert len(froms) == 1
    assert Version(_ray_version()) in _pinned("ray"), "the image's Ray must be the one the package pins"


def test_dockerfile_pins_tensorflow_and_installs_the_package() -> None:
    tf = _docker_args().get("TF_VERSION", "")
    assert re.fullmatch(r"\d+\.\d+\.\d+", tf), "TensorFlow version must be pinned exactly"
    specs = _pip_specs()
    assert len(specs) >= 8
    for spec in specs:
        [(op, version)] = [(s.operator, s.version) for s in spec.specifier]
        assert op == "==", f"unpinned dependency {spec} in Dockerfile"
        if spec.name in {Requirement(r).name for r in PYPROJECT["project"]["dependencies"]}:
            assert Version(version) in _pinned(spec.name), f"Dockerfile's {spec} is outside pyproject's range"
    [gpu_tf] = [s for s in specs if s.name == "tensorflow"]
    assert "and-cuda" in gpu_tf.extras and str(gpu_tf.specifier) == f"=={tf}", "GPU TensorFlow at TF_VERSION"
    runs = [arg for op, arg in _dockerfile() if op == "RUN"]
    assert any(re.search(r"pip install .*--no-deps \.(\s|$)", r) for r in runs), "the package itself must be installed"
    assert _in_image("pyproject.toml", _workdir()) == REPO / "pyproject.toml", "pip install . needs the project"
    assert _in_image("wbc_batch/cli.py", _workdir()) == REPO / "wbc_batch" / "cli.py"
    for job in sorted((REPO / "jobs").glob("*.py")):
        assert _in_image(f"jobs/{job.name}", _workdir()) == job, f"the image lacks jobs/{job.name}"


def _workdir() -> str:
    [workdir] = [arg for op, arg in _dockerfile() if op == "WORKDIR"]
    return workdir


@pytest.mark.parametrize("where", [w for w, _ in _ray_cluster_specs()])
def test_every_ray_cluster_carries_what_kuberay_needs(where: str) -> None:
    spec = dict(_ray_cluster_specs())[where]
    assert spec["rayVersion"] == _ray_version(), f"{where}: rayVersion must be the image's Ray"
    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    assert isinstance(groups, list) and groups, f"{where}: no workerGroupSpecs"
    assert len({g["groupName"] for g in groups}) == len(groups), f"{where}: worker group names must differ"
    for name, group in [("head", head), *((g["groupName"], g) for g in groups)]:
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), f"{where} {name}: rayStartParams values are strings"
        containers = group["template"]["spec"]["containers"]
        assert containers, f"{where} {name}: no container"
        for c in containers:
            assert c["name"] and c["image"], f"{where} {name}: a container needs a name and an image"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where} {name}: {kind} cpu and memory"
            if "workingDir" in c:
                assert _in_image("jobs", c["workingDir"]), f"{where} {name}: jobs/ is not under {c['workingDir']}"
        gpus = containers[0]["resources"]["limits"].get("nvidia.com/gpu", "0")
        assert params.get("num-gpus", gpus) == gpus, f"{where} {name}: num-gpus must match the GPU limit"
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where} {g['groupName']}: replicas"


def test_raycluster_cpu_head_and_autoscaling_gpu_workers() -> None:
    [(_, rc)] = _by_kind("RayCluster")
    spec = rc["spec"]
    assert rc["apiVersion"] == "ray.io/v1" and spec["rayVersion"] == _ray_version()
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    head_res = head["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_res.get("limits", {})
    [gpu] = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] < gpu["maxReplicas"], "GPU group must be able to scale"
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["rayStartParams"]["num-gpus"] == worker["resources"]["limits"]["nvidia.com/gpu"]


def test_rayjob_runs_one_classify() -> None:
    [(_, job)] = _by_kind("RayJob")
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1"
    [(sub, _)] = list(_commands(spec["entrypoint"]))
    assert sub == "classify"
    [script] = re.findall(r"\S*jobs/\w+\.py", spec["entrypoint"])
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert _in_image(script, head.get("workingDir", _workdir())), f"{script} is not in the image where the job runs"
    assert spec["shutdownAfterJobFinishes"] is True
    gpu = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_cronjob_forbids_overlap_and_submits_with_a_deterministic_id() -> None:
    [(_, cron)] = _by_kind("CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["timeZone"] == "Etc/UTC"
    fields = spec["schedule"].split()
    assert len(fields) == 5 and "*" not in fields[:2], "must run once a day at a fixed time"
    [container] = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    script = _in_image(container["command"][-1])
    assert script == INFRA / "scripts" / "submit-nightly.sh", f"{container['command']} runs no file of the image"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def _submit_nightly(tmp_path: Path, states: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run infra/scripts/submit-nightly.sh with a stub ``ray`` on PATH; ``states``: submission id -> job status.

    The stub answers ``ray job status`` from ``states`` (nothing for an unknown id), records every call, and
    marks a submitted id SUCCEEDED. Returns the script's result and the stub's calls.
    """
    bin_dir, calls, state_dir = tmp_path / "bin", tmp_path / "calls.jsonl", tmp_path / "states"
    bin_dir.mkdir(parents=True)
    state_dir.mkdir()
    for sid, state in states.items():
        (state_dir / sid).write_text(state)
    stub = bin_dir / "ray"
    stub.write_text(f"""#!{sys.executable}
import json, pathlib, sys
args = sys.argv[1:]
with open({str(calls)!r}, "a") as fh:
    fh.write(json.dumps(args) + "\\n")
states = pathlib.Path({str(state_dir)!r})
if args[:2] == ["job", "status"]:
    f = states / args[-1]
    print(f"Job {{args[-1]}}: status " + f.read_text()) if f.exists() else sys.exit(1)
elif args[:2] == ["job", "submit"]:
    (states / args[args.index("--submission-id") + 1]).write_text("SUCCEEDED")
""")
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_ADDRESS": "http://head:8265",
           "INPUT_URI": "s3://in/incoming", "OUTPUT_URI": "s3://out/wbc-batch"}
    proc = subprocess.run(["bash", str(INFRA / "scripts" / "submit-nightly.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    recorded = [json.loads(ln) for ln in calls.read_text().splitlines()] if calls.exists() else []
    return proc, recorded


def _submitted(calls: list[list[str]]) -> list[tuple[str, str, list[str]]]:
    """(submission id, run id, job command) of each ``ray job submit`` call."""
    out = []
    for c in calls:
        if c[:2] == ["job", "submit"]:
            command = c[c.index("--") + 1 :]
            out.append((c[c.index("--submission-id") + 1], command[command.index("--run-id") + 1], command))
    return out


def test_submit_script_uses_one_deterministic_id_per_night_and_retries_under_a_new_submission(
        tmp_path: Path) -> None:
    nights = {f"nightly-{datetime.now(timezone.utc):%Y%m%d}"}
    proc, calls = _submit_nightly(tmp_path / "fresh", {})
    nights.add(f"nightly-{datetime.now(timezone.utc):%Y%m%d}")  # the script may have run across midnight
    assert proc.returncode == 0, proc.stderr
    [(sid, run_id, command)] = _submitted(calls)
    assert sid == run_id and run_id in nights, "a fresh night submits under its own run id"
    assert command[:2] == ["python", "jobs/nightly.py"] and command[2:4] == ["s3://in/incoming", "s3://out/wbc-batch"]
    build_parser().parse_args(["nightly", *command[2:]])
    # a failed submission of the night: resubmitted under a new submission id with the same run id
    proc, calls = _submit_nightly(tmp_path / "failed", {run_id: "FAILED"})
    assert proc.returncode == 0, proc.stderr
    [(sid, again, _)] = _submitted(calls)
    assert again == run_id and sid == f"{run_id}-r1"
    # a night already done submits nothing
    proc, calls = _submit_nightly(tmp_path / "done", {run_id: "SUCCEEDED"})
    assert proc.returncode == 0 and not _submitted(calls)
    # a missing setting stops it before any call to Ray
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "INPUT_URI", "OUTPUT_URI")}
    proc = subprocess.run(["bash", str(INFRA / "scripts" / "submit-nightly.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "RAY_ADDRESS" in proc.stderr


def test_raycronjob_is_documented_as_alpha() -> None:
    [(path, rcj)] = _by_kind("RayCronJob")
    assert rcj["apiVersion"] == "ray.io/v1"
    assert "RayCronJob=true" in path.read_text() and "alpha" in path.read_text().lower()
    entrypoint = rcj["spec"]["jobTemplate"]["entrypoint"]
    [(sub, _)] = list(_commands(entrypoint))
    assert sub == "nightly"
    [script] = re.findall(r"\S*jobs/\w+\.py", entrypoint)
    head = rcj["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert _in_image(script, head.get("workingDir", _workdir())), f"{script} is not in the image where the job runs"
    assert "RayCronJob" in (INFRA / "README.md").read_text()


def test_secrets_come_from_kubernetes_secrets_only() -> None:
    sensitive = {"RAY_AUTH_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    token_refs: list[tuple[str, str]] = []
    s3_refs: set[str] = set()
    for path in YAML_FILES:
        if path.name == "docker-compose.yml":
            continue
        for doc in _docs(path):
            assert doc.get("kind") != "Secret", f"{path.name}: Secret values must not be committed"
            for where, value in _walk(doc):
                if isinstance(value, dict) and value.get("name") in sensitive and "value" in value:
                    pytest.fail(f"{path.name}:{where} sets {value['name']} inline")
                if isinstance(value, dict) and value.get("name") == "RAY_AUTH_TOKEN":
                    ref = value["valueFrom"]["secretKeyRef"]
                    token_refs.append((ref["name"], ref["key"]))
                if isinstance(value, dict) and "secretRef" in value:
                    s3_refs.add(value["secretRef"]["name"])
    assert len(token_refs) >= 5  # head, worker, autoscaler, submitter, cron pod
    assert len(set(token_refs)) == 1, f"every process must read the same token: {sorted(set(token_refs))}"
    assert len(s3_refs) == 1, f"one S3 credentials Secret: {sorted(s3_refs)}"
    readme = (INFRA / "README.md").read_text()
    for secret in {token_refs[0][0], *s3_refs}:
        assert f"kubectl create secret generic {secret}" in readme, f"infra/README.md must say how to create {secret}"
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if key in sensitive | {"MINIO_ROOT_PASSWORD"}:
                assert re.fullmatch(r"\$\{\w+(:\?[^}]*)?\}", str(value)), f"compose {name}: {key} is set inline"
    assert compose["services"]["ray-head"]["environment"]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")


def test_compose_has_minio_and_a_ray_head() -> None:
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["minio"]["image"].startswith("minio/minio:")
    assert services["ray-head"]["command"][:3] == ["ray", "start", "--head"]
    build = services["ray-head"]["build"]
    assert ((INFRA / build["context"]).resolve() / build["dockerfile"]).resolve() == INFRA / "Dockerfile"
    endpoint = urlsplit(services["nightly"]["environment"]["AWS_ENDPOINT_URL"])
    assert endpoint.hostname in services, "the S3 endpoint must be a compose service"
    published = {str(p).rsplit(":", 1)[-1] for p in services[endpoint.hostname]["ports"]}
    assert str(endpoint.port) in published
    command = services["nightly"]["command"]
    assert _in_image(command[command.index("--") + 2], services["nightly"]["working_dir"])


def test_s3_policy_is_least_privilege() -> None:
    policy = json.loads((INFRA / "iam" / "s3-policy.json").read_text())
    statements = policy["Statement"]
    for st in statements:
        assert st["Effect"] == "Allow"
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        assert all(a.startswith("s3:") and "*" not in a for a in actions), "no wildcard actions"
        assert all(r != "*" and r.startswith("arn:aws:s3:::") for r in resources)
        if "s3:ListBucket" in actions:
            assert st["Condition"]["StringLike"]["s3:prefix"], "listing must be limited to a prefix"
        if {"s3:PutObject", "s3:DeleteObject"} & set(actions):
            assert all("/wbc-batch/" in r for r in resources), "writes only under the output prefix"
    reads = [st for st in statements if st["Action"] == "s3:GetObject"]
    assert reads and all(st["Resource"].endswith("/incoming/*") for st in reads)


def _unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(path.read_text())
    return unit


def test_systemd_timer_and_cron_run_nightly() -> None:
    timer = _unit(INFRA / "systemd" / "wbc-nightly.timer")
    assert timer["Timer"]["OnCalendar"] and timer["Timer"]["Persistent"] == "true"
    service_path = INFRA / "systemd" / timer["Timer"].get("Unit", "wbc-nightly.service")
    assert service_path.is_file(), f"the timer starts {service_path.name}, which is not in infra/systemd"
    service = _unit(service_path)["Service"]
    assert service["Type"] == "oneshot" and service["EnvironmentFile"]
    assert str(EXIT_LEASE_HELD) in service["SuccessExitStatus"].split(), "a held lease is not a unit failure"
    assert [sub for sub, _ in _commands(service["ExecStart"].replace("%%", "%"))] == ["nightly"]
    cron = (INFRA / "cron" / "wbc-nightly.cron").read_text()
    [line] = [ln for ln in cron.splitlines() if ln and not ln.startswith(("#", "CRON_TZ"))]
    minute, hour, *_, user = line.split()[:6]
    assert minute.isdigit() and hour.isdigit() and not user.isdigit(), "five time fields, then the user (cron.d)"
    assert [sub for sub, _ in _commands(line.replace("\\%", "%"))] == ["nightly"]


def test_commands_in_infra_exist_in_the_cli_with_those_flags() -> None:
    commands = _all_commands()
    found = {sub for _, sub, _ in commands}
    assert {"classify", "nightly"} <= found, f"expected classify and nightly commands, found {sorted(found)}"
    assert len(commands) >= 6
    parser = build_parser()
    for where, sub, args in commands:
        try:
            parsed = parser.parse_args([sub, *args])
        except SystemExit:
            pytest.fail(f"{where}: `{sub} {shlex.join(args)}` is not accepted by wbc-batch")
        assert parsed.command == sub


def test_every_jobs_file_and_console_script_named_exists() -> None:
    named = {m for _, text in _texts() for m in re.findall(r"(?<![\w/])jobs/(\w+\.py)", text)}
    assert {"classify.py", "nightly.py"} <= named
    for name in named:
        assert (REPO / "jobs" / name).is_file(), f"infra/ names jobs/{name}, which does not exist"
    scripts = PYPROJECT["project"]["scripts"]
    used = {m for _, text in _texts() for m in re.findall(r"(?:^|[\s/'\"])(wbc-batch)(?=\s)", text)}
    assert used and used <= set(scripts), f"console scripts used in infra/ but not declared: {used - set(scripts)}"
    for name in used:
        module, _, attr = scripts[name].partition(":")
        assert callable(getattr(import_module(module), attr)), f"{name} = {scripts[name]} does not resolve"


@pytest.mark.parametrize("sub", ["classify", "nightly"])
def test_job_entry_points_exist(sub: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = REPO / "jobs" / f"{sub}.py"
    assert path.is_file()
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        runpy.run_path(str(path), run_name="__main__")
    assert info.value.code == 0
    assert out.getvalue().startswith(f"usage: wbc-batch {sub} "), f"jobs/{sub}.py must run `wbc-batch {sub}`"


def test_a_wrong_flag_would_be_caught() -> None:
    """The command check itself must be able to fail."""
    [(sub, args)] = list(_commands("ray job submit -- python jobs/nightly.py s3://a s3://b --no-such-flag 1"))
    with pytest.raises(SystemExit):
        build_parser().parse_args([sub, *args])
    assert list(_commands("bash -c 'python jobs/nightly.py \"$IN\" \"$OUT\" --run-id \"n-$(date +%Y)\"'")) == [
        ("nightly", ["$IN", "$OUT", "--run-id", "n-$(date +%Y)"])
    ]
