"""The deployment files in infra/ parse, say what matters, pin their images, and run real CLI commands.

A manifest that names a flag the CLI does not have only fails at 01:30 on a cluster; these tests
make it fail here instead, by parsing every command with ``wbc_batch.cli.build_parser()``.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from wbc_batch.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
YAML_FILES = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
JSON_FILES = sorted(INFRA.rglob("*.json"))
SHELL_OPERATORS = {";", "&&", "||", "|", ">", ">>", "2>&1", "&"}


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
    assert froms == ["rayproject/ray:2.60.0-py311-gpu"]


def test_dockerfile_pins_tensorflow_and_installs_the_package() -> None:
    text = (INFRA / "Dockerfile").read_text()
    tf = re.search(r"ARG TF_VERSION=(\S+)", text)
    assert tf and re.fullmatch(r"\d+\.\d+\.\d+", tf.group(1)), "TensorFlow version must be pinned exactly"
    assert '"tensorflow[and-cuda]==${TF_VERSION}"' in text
    assert re.search(r"pip install [^\n]*--no-deps \.", text), "the package itself must be installed"
    assert "COPY --chown=ray:users jobs ./jobs" in text
    pip_block = re.search(r"RUN pip install --no-cache-dir \\\n((?:.*\\\n)*.*)", text)
    assert pip_block
    specs = re.findall(r'"([^"]+)"', pip_block.group(1))
    assert len(specs) >= 8
    for spec in specs:
        assert re.fullmatch(r"[a-z0-9_.\[\]-]+==[\w.${}]+", spec), f"unpinned dependency {spec!r} in Dockerfile"


def test_raycluster_cpu_head_and_autoscaling_gpu_workers() -> None:
    [(_, rc)] = _by_kind("RayCluster")
    spec = rc["spec"]
    assert rc["apiVersion"] == "ray.io/v1" and spec["rayVersion"] == "2.60.0"
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
    assert spec["entrypoint"].startswith("python jobs/classify.py ")
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
    script_path = container["command"][-1]
    assert script_path == "/home/ray/app/infra/scripts/submit-nightly.sh"
    script = (INFRA / "scripts" / "submit-nightly.sh").read_text()
    assert 'run_id="nightly-${night}"' in script and 'night="$(date -u +%Y%m%d)"' in script
    assert re.search(r'ray job submit [^\n]*--submission-id "\$submission_id"', script)
    assert '--run-id "$run_id"' in script


def test_raycronjob_is_documented_as_alpha() -> None:
    [(path, rcj)] = _by_kind("RayCronJob")
    assert rcj["apiVersion"] == "ray.io/v1"
    assert "RayCronJob=true" in path.read_text() and "alpha" in path.read_text().lower()
    assert "python jobs/nightly.py" in rcj["spec"]["jobTemplate"]["entrypoint"]
    assert "RayCronJob" in (INFRA / "README.md").read_text()


def test_secrets_come_from_kubernetes_secrets_only() -> None:
    sensitive = {"RAY_AUTH_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    token_refs = 0
    for path in YAML_FILES:
        if path.name == "docker-compose.yml":
            continue
        for doc in _docs(path):
            assert doc.get("kind") != "Secret", f"{path.name}: Secret values must not be committed"
            for where, value in _walk(doc):
                if isinstance(value, dict) and value.get("name") in sensitive and "value" in value:
                    pytest.fail(f"{path.name}:{where} sets {value['name']} inline")
                if isinstance(value, dict) and value.get("name") == "RAY_AUTH_TOKEN":
                    assert value["valueFrom"]["secretKeyRef"]["name"] == "wbc-ray-auth"
                    token_refs += 1
                if isinstance(value, dict) and "secretRef" in value:
                    assert value["secretRef"]["name"] == "wbc-s3"
    assert token_refs >= 5  # head, worker, autoscaler, submitter, cron pod
    compose = (INFRA / "docker-compose.yml").read_text()
    assert re.search(r"RAY_AUTH_TOKEN: \$\{RAY_AUTH_TOKEN:\?", compose), "compose takes the token from the environment"
    assert re.search(r"AWS_SECRET_ACCESS_KEY: \$\{", compose)


def test_compose_has_minio_and_a_ray_head() -> None:
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["minio"]["image"].startswith("minio/minio:")
    assert services["ray-head"]["command"][:3] == ["ray", "start", "--head"]
    assert services["ray-head"]["build"]["dockerfile"] == "infra/Dockerfile"
    assert services["nightly"]["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"


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


def test_systemd_timer_and_cron_run_nightly() -> None:
    timer = (INFRA / "systemd" / "wbc-nightly.timer").read_text()
    assert "OnCalendar=" in timer and "Persistent=true" in timer
    service = (INFRA / "systemd" / "wbc-nightly.service").read_text()
    assert "Type=oneshot" in service and "SuccessExitStatus=75" in service
    assert "EnvironmentFile=" in service
    cron = (INFRA / "cron" / "wbc-nightly.cron").read_text()
    [line] = [ln for ln in cron.splitlines() if ln and not ln.startswith(("#", "CRON_TZ"))]
    assert len(line.split()[:6]) == 6 and "wbc-batch nightly" in line


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


@pytest.mark.parametrize("sub", ["classify", "nightly"])
def test_job_entry_points_exist(sub: str) -> None:
    path = REPO / "jobs" / f"{sub}.py"
    assert path.is_file()
    assert f'main(["{sub}", *sys.argv[1:]])' in path.read_text()


def test_a_wrong_flag_would_be_caught() -> None:
    """The command check itself must be able to fail."""
    [(sub, args)] = list(_commands("ray job submit -- python jobs/nightly.py s3://a s3://b --no-such-flag 1"))
    with pytest.raises(SystemExit):
        build_parser().parse_args([sub, *args])
    assert list(_commands("bash -c 'python jobs/nightly.py \"$IN\" \"$OUT\" --run-id \"n-$(date +%Y)\"'")) == [
        ("nightly", ["$IN", "$OUT", "--run-id", "n-$(date +%Y)"])
    ]
