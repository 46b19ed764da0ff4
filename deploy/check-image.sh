#!/usr/bin/env bash
# Build the lossd images with podman and run them, on a machine that reaches no container registry:
#   1. bootstrap a Debian base image (debootstrap; Debian's mirror must be reachable),
#   2. build Dockerfile (CPU) on it, run it, wait for /v2/health/ready, time the cold start, make a CIoU call
#      from the host and check the answer,
#   3. build Dockerfile.gpu on the same Debian base with torch's CPU build (no CUDA base image is reachable),
#      and check, inside it, the compiler that torch.compile needs at run time: gcc builds a C extension
#      against Python's headers (what Triton does for each GPU kernel), and torch.compile runs on a CPU tensor.
# Run as root:  deploy/check-image.sh            (SKIP_GPU=1 skips step 3)
# Environment: WORK (scratch folder, default /var/tmp/lossd-check), WHEELS (a local wheel folder mounted into
# the build, default /opt/wheels when it exists; it supplies torch's CPU build), TORCH_INDEX_URL, HTTP_PORT,
# GRPC_PORT (host ports, default 18000/15051).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/var/tmp/lossd-check}
HTTP_PORT=${HTTP_PORT:-18000}
GRPC_PORT=${GRPC_PORT:-15051}
BASE_IMAGE=localhost/lossd-debian-base:bookworm
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
mkdir -p "$WORK"

need=()
for tool in podman runc debootstrap curl; do command -v "$tool" >/dev/null || need+=("$tool"); done
if ((${#need[@]})); then apt-get update && apt-get install -y podman runc debootstrap curl; fi

# podman as these machines need it: Debian's runc, and ulimits the default ones (unlimited) break
PODMAN=(podman --runtime runc)
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
# pip inside the build uses this machine's CA bundle, pip configuration and local wheels
MOUNTS=()
for path in /etc/ssl/certs /etc/pip.conf /etc/xdg/pip; do
    [[ -e $path ]] && MOUNTS+=(-v "$path:$path:ro")
done
BUILD_ARGS=(--build-arg "BASE=$BASE_IMAGE")
WHEELS=${WHEELS:-$([[ -d /opt/wheels ]] && echo /opt/wheels || true)}
if [[ -n $WHEELS ]]; then
    MOUNTS+=(-v "$WHEELS:/wheels:ro")
    BUILD_ARGS+=(--build-arg PIP_FIND_LINKS=/wheels)
    # the wheel folder holds torch's CPU build: no need for download.pytorch.org
    TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}
fi
[[ -n ${TORCH_INDEX_URL:-} ]] && BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")

step() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }

if ! "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    step "debootstrap $SUITE into $WORK/rootfs"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$WORK/rootfs" "$MIRROR"
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - "$BASE_IMAGE"
fi

step "build lossd:cpu (Dockerfile)"
t0=$(date +%s)
# --format docker: the OCI format has no HEALTHCHECK
"${PODMAN[@]}" build --format docker "${LIMITS[@]}" "${MOUNTS[@]}" "${BUILD_ARGS[@]}" -f Dockerfile -t localhost/lossd:cpu .
echo "build: $(($(date +%s) - t0)) s"
"${PODMAN[@]}" image inspect localhost/lossd:cpu --format 'image size: {{.Size}} bytes'

step "run lossd:cpu"
"${PODMAN[@]}" rm -f lossd-check >/dev/null 2>&1 || true
trap '"${PODMAN[@]}" rm -f lossd-check >/dev/null 2>&1 || true' EXIT
t0=$(date +%s.%N)
"${PODMAN[@]}" run -d --name lossd-check "${LIMITS[@]}" -p "127.0.0.1:$HTTP_PORT:8000" \
    -p "127.0.0.1:$GRPC_PORT:50051" localhost/lossd:cpu >/dev/null
ready=""
for _ in $(seq 3000); do
    if curl -sf "http://127.0.0.1:$HTTP_PORT/v2/health/ready" >/dev/null; then ready=1; break; fi
    if [[ $("${PODMAN[@]}" inspect -f '{{.State.Running}}' lossd-check) != true ]]; then break; fi
    sleep 0.1  # polling readiness, not a guess at the start-up time
done
if [[ -z $ready ]]; then "${PODMAN[@]}" logs lossd-check; echo "lossd:cpu never became ready" >&2; exit 1; fi
echo "cold start (container start to /v2/health/ready): $(echo "$(date +%s.%N) - $t0" | bc) s"
answer=$(curl -sf -X POST "http://127.0.0.1:$HTTP_PORT/v1/losses/ciou" -H 'content-type: application/json' \
    -d '{"pred": [[0, 0, 10, 10]], "target": [[1, 1, 11, 11]]}')
echo "CIoU answer: $answer"
# by hand: IoU 81/119, centre distance 2 over the enclosing box's squared diagonal 242, equal aspect ratios
python3 - "$answer" <<'PY'
import json, sys
loss = json.loads(sys.argv[1])["loss"][0]
want = 1 - 81 / 119 + 2 / 242
assert abs(loss - want) < 1e-6, (loss, want)
print(f"CIoU {loss:.7f} == 1 - 81/119 + 2/242 = {want:.7f}")
PY
# the API docs page and its assets come from the container itself
curl -sf "http://127.0.0.1:$HTTP_PORT/docs" | grep -q "/docs-static/swagger-ui-bundle.js"
curl -sf -o /dev/null "http://127.0.0.1:$HTTP_PORT/docs-static/swagger-ui-bundle.js"
echo "/docs and its Swagger UI assets served by the container"
"${PODMAN[@]}" image inspect --format 'health check: {{json .HealthCheck.Test}}' localhost/lossd:cpu
"${PODMAN[@]}" logs lossd-check 2>&1 | tail -3
"${PODMAN[@]}" rm -f lossd-check >/dev/null

[[ ${SKIP_GPU:-} == 1 ]] && exit 0
step "build Dockerfile.gpu on $BASE_IMAGE with torch's CPU build"
t0=$(date +%s)
"${PODMAN[@]}" build --format docker "${LIMITS[@]}" "${MOUNTS[@]}" "${BUILD_ARGS[@]}" --build-arg TORCH_VERSION=2.13.0+cpu \
    -f Dockerfile.gpu -t localhost/lossd:gpu-on-debian .
echo "build: $(($(date +%s) - t0)) s"
"${PODMAN[@]}" image inspect localhost/lossd:gpu-on-debian --format 'image size: {{.Size}} bytes'

step "run-time compiler inside the GPU image"
"${PODMAN[@]}" run --rm "${LIMITS[@]}" --entrypoint python3 localhost/lossd:gpu-on-debian -c '
import os, subprocess, sysconfig, tempfile, torch
# what Triton does for each GPU kernel: build a C extension against Python.h with gcc
src = "#include <Python.h>\nstatic struct PyModuleDef m = {PyModuleDef_HEAD_INIT, \"probe\"};\nPyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&m); }\n"
d = tempfile.mkdtemp()
open(os.path.join(d, "probe.c"), "w").write(src)
so = os.path.join(d, "probe" + sysconfig.get_config_var("EXT_SUFFIX"))
subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-I" + sysconfig.get_paths()["include"], os.path.join(d, "probe.c"), "-o", so], check=True)
import sys; sys.path.insert(0, d); import probe
print("gcc built and loaded a C extension against Python.h:", probe.__file__)
f = torch.compile(lambda x: torch.sin(x) * 2 + x, fullgraph=True)
x = torch.linspace(-3, 3, 1000)
assert torch.allclose(f(x), torch.sin(x) * 2 + x)
print("torch.compile on a CPU tensor: ok (torch", torch.__version__ + ")")
'
