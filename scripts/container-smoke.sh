#!/usr/bin/env bash
# Container smoke test without a Docker engine: build the Dockerfile with buildah (chroot isolation),
# run the image's command on the host network, and check /health and /generate from outside with curl.
#
#   make container-smoke                     # or: bash scripts/container-smoke.sh
#
# Settings (environment):
#   BASE_IMAGE      base for the Dockerfile (default python:3.11-slim). When it is not in local storage
#                   (nothing outside the package registries is reachable here) a Debian bookworm base is
#                   built with debootstrap and imported as localhost/textgen-base:bookworm.
#   SMOKE_PULL=1    try `buildah pull BASE_IMAGE` before falling back to the local base.
#   IMAGE           tag to build (default localhost/textgen:smoke)
#   SMOKE_PORT      port to serve on, on 127.0.0.1 (default: a free one)
#   SMOKE_MODEL     a model directory to serve, mounted read-only at /model; "demo" serves the built-in
#                   demo model (built on first start, ~3 min). Default: a tiny GPT-2 built here.
#   SMOKE_NO_CACHE=1  build without the layer cache (a cold build time).
#   SMOKE_WORKDIR   scratch space (default /var/tmp/textgen-smoke)
#   SMOKE_BUILD_TIMEOUT / SMOKE_START_TIMEOUT  bounds in seconds (defaults 2400 / 300, demo: 900)
# Needs root (buildah's chroot isolation); installs buildah and debootstrap with apt when missing.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
LOCAL_BASE=localhost/textgen-base:bookworm
IMAGE=${IMAGE:-localhost/textgen:smoke}
WORK=${SMOKE_WORKDIR:-/var/tmp/textgen-smoke}
SMOKE_MODEL=${SMOKE_MODEL:-}
BUILD_TIMEOUT=${SMOKE_BUILD_TIMEOUT:-2400}
if [ "$SMOKE_MODEL" = demo ]; then START_TIMEOUT=${SMOKE_START_TIMEOUT:-900}; else START_TIMEOUT=${SMOKE_START_TIMEOUT:-300}; fi
HOST_PY=${HOST_PY:-$ROOT/.venv/bin/python}
[ -x "$HOST_PY" ] || HOST_PY=python3

T0=$(date +%s)
step() { printf '\n==> [%4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: buildah's chroot isolation needs it"
mkdir -p "$WORK"

# --- tools ------------------------------------------------------------------------------------------------
step "tools: buildah, debootstrap, curl"
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
    info "installing with apt: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -q >/dev/null
    timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
info "$(buildah --version)"

# --- base image -------------------------------------------------------------------------------------------
have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

step "base image: $BASE_IMAGE"
if have_image "$BASE_IMAGE"; then
    info "found in local storage"
elif [ "${SMOKE_PULL:-0}" = 1 ] && timeout 600 buildah pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    info "pulled"
else
    info "not in local storage; using a local Debian bookworm base ($LOCAL_BASE) instead"
    BASE_IMAGE=$LOCAL_BASE
    if have_image "$LOCAL_BASE"; then
        info "found in local storage"
    else
        rootfs=$WORK/rootfs
        rm -rf "$rootfs"
        info "debootstrap --variant=minbase bookworm (+ python3, python3-venv, ca-certificates): about a minute"
        mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
        timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
            || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed (log: $WORK/debootstrap.log)"; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        info "importing the rootfs ($(du -sh "$rootfs" | cut -f1))"
        tar -C "$rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf "$WORK/rootfs.tar" .
        ctr=$(buildah from scratch)
        buildah add --quiet "$ctr" "$WORK/rootfs.tar" / >/dev/null
        buildah config --env LANG=C.UTF-8 --cmd '["python3"]' "$ctr"
        buildah commit --quiet "$ctr" "$LOCAL_BASE" >/dev/null
        buildah rm "$ctr" >/dev/null
        rm -rf "$rootfs" "$WORK/rootfs.tar"
        info "imported $LOCAL_BASE"
    fi
fi
probe=$(buildah from --quiet "$BASE_IMAGE")
info "python in base: $(buildah run --isolation chroot "$probe" -- python3 --version 2>&1 || echo 'none (the build will fail)')"
buildah rm "$probe" >/dev/null

# --- pip sources for the build: the host's find-links (CPU torch wheel), local mirrors, CA bundle ------------
step "pip sources mounted into the build"
pip_cfg() { "$HOST_PY" -m pip config get "$1" 2>/dev/null || true; }
FIND_LINKS=${PIP_FIND_LINKS:-$(pip_cfg global.find-links)}
EXTRA_INDEX=${PIP_EXTRA_INDEX_URL:-$(pip_cfg global.extra-index-url)}
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
mounts=()
declare -A mounted=()
mount_local() {  # $1: a path or file:// URL; mounts its directory read-only at the same path
    local path=${1#file://} dir
    [ -e "$path" ] || return 1
    dir=$path
    [ "$(basename "$dir")" = simple ] && dir=$(dirname "$dir")  # a PEP 503 index links to ../files
    if [ -z "${mounted[$dir]:-}" ]; then mounts+=(-v "$dir:$dir:ro"); mounted[$dir]=1; info "mount $dir"; fi
}
fl_kept=()
for loc in $FIND_LINKS; do mount_local "$loc" && fl_kept+=("$loc"); done
[ ${#fl_kept[@]} -gt 0 ] && build_args+=(--build-arg "PIP_FIND_LINKS=${fl_kept[*]}")
ei_kept=()
for loc in $EXTRA_INDEX; do
    case $loc in
        file://*) mount_local "$loc" && ei_kept+=("$loc") ;;
        *) ei_kept+=("$loc") ;;
    esac
done
[ ${#ei_kept[@]} -gt 0 ] && build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=${ei_kept[*]}")
[ -n "${TORCH_SPEC:-}" ] && build_args+=(--build-arg "TORCH_SPEC=$TORCH_SPEC")
[ -n "${TORCH_INDEX_URL:-}" ] && build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
# A TLS-intercepting proxy's CA: the host's bundle, so pip in the build trusts what the host's pip trusts.
CA_BUNDLE=${PIP_CERT:-${REQUESTS_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}}
if [ -f "$CA_BUNDLE" ]; then
    mounts+=(-v "$(dirname "$CA_BUNDLE"):/opt/host-ca:ro")
    build_args+=(--build-arg "PIP_CERT=/opt/host-ca/$(basename "$CA_BUNDLE")")
    info "CA bundle $CA_BUNDLE (as PIP_CERT)"
fi
info "find-links: ${fl_kept[*]:-none}; extra index: ${ei_kept[*]:-none}"

# --- build ------------------------------------------------------------------------------------------------
step "build $IMAGE from Dockerfile (buildah bud --isolation chroot; torch + deps take several minutes cold)"
cache_flags=(--layers)
[ "${SMOKE_NO_CACHE:-0}" = 1 ] && cache_flags+=(--no-cache)
info "full log: $WORK/build.log"
B0=$(date +%s)
set +e
timeout "$BUILD_TIMEOUT" buildah bud --isolation chroot --format docker "${cache_flags[@]}" \
    "${build_args[@]}" "${mounts[@]}" -f Dockerfile -t "$IMAGE" . 2>&1 | tee "$WORK/build.log" \
    | while IFS= read -r line; do
        case $line in
            "["*"] STEP "* | "STEP "* | torch* | COMMIT* | Successfully* | *rror*)
                printf '    [%4ss] %s\n' "$(($(date +%s) - B0))" "${line:0:150}" ;;
        esac
    done
build_rc=${PIPESTATUS[0]}
set -e
BUILD_S=$(($(date +%s) - B0))
[ "$build_rc" -eq 0 ] || { tail -30 "$WORK/build.log"; die "build failed (exit $build_rc) after ${BUILD_S}s (log: $WORK/build.log)"; }
SIZE=$(buildah images --format '{{.Size}}' "$IMAGE" | head -1)
info "built in ${BUILD_S}s; image size $SIZE"

# --- run --------------------------------------------------------------------------------------------------
PORT=${SMOKE_PORT:-$("$HOST_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
URL=http://127.0.0.1:$PORT
run_env=(--env TEXTGEN_HOST=127.0.0.1 --env "TEXTGEN_PORT=$PORT" --env HF_HUB_OFFLINE=1)
run_mounts=()
cache=$WORK/cache
mkdir -p "$cache" && chown 10001:10001 "$cache"
run_mounts+=(-v "$cache:/var/cache/textgen")
if [ "$SMOKE_MODEL" = demo ]; then
    step "model: the built-in demo model (built into $cache on first start)"
elif [ -n "$SMOKE_MODEL" ]; then
    step "model: $SMOKE_MODEL"
    run_mounts+=(-v "$(realpath "$SMOKE_MODEL"):/model:ro")
    run_env+=(--env TEXTGEN_MODEL=/model)
else
    model=$WORK/tiny-gpt2
    step "model: a tiny GPT-2 (2 layers) built with tests/conftest.py's build_tiny_gpt2 into $model"
    if [ ! -f "$model/config.json" ]; then
        HF_HUB_OFFLINE=1 "$HOST_PY" -c "import sys; from pathlib import Path; sys.path.insert(0, '.'); \
from tests.conftest import build_tiny_gpt2; build_tiny_gpt2(Path(sys.argv[1]))" "$model"
    fi
    chmod -R a+rX "$model"
    run_mounts+=(-v "$model:/model:ro")
    run_env+=(--env TEXTGEN_MODEL=/model)
fi

# The image's own settings (Docker format config): command, user, health check.
buildah inspect --type image "$IMAGE" >"$WORK/inspect.json"
image_cfg() {  # $1: a Python expression over c, the image's Docker config
    "$HOST_PY" -c 'import json, sys; c = json.load(open(sys.argv[1]))["Docker"]["config"]; print(eval(sys.argv[2]))' \
        "$WORK/inspect.json" "$1"
}
mapfile -t CMD < <(image_cfg '"\n".join(c["Cmd"])')
USER_CFG=$(image_cfg 'c.get("User") or "0"')
# the HEALTHCHECK test as argv lines ("CMD-SHELL x" becomes /bin/sh -c x); empty when there is none
HC_ARGV=$(image_cfg '"\n".join((t[1:] if t[0] == "CMD" else ["/bin/sh", "-c", " ".join(t[1:])]) if (t := (c.get("Healthcheck") or {}).get("Test")) and t[0] != "NONE" else [])')
step "run the image's command ${CMD[*]} as user $USER_CFG on $URL (buildah run --isolation chroot, host network)"
CTR=$(buildah from --quiet "$IMAGE")
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 40); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    fi
    buildah rm "$CTR" >/dev/null 2>&1 || true
}
trap cleanup EXIT
# setsid: the server gets its own process group, so stopping it signals exactly what this script started.
setsid buildah run --isolation chroot --user "$USER_CFG" "${run_env[@]}" "${run_mounts[@]}" "$CTR" -- "${CMD[@]}" \
    >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!
info "server process group $SERVER_PID, log $WORK/serve.log"

step "wait for $URL/health (at most ${START_TIMEOUT}s)"
S0=$(date +%s)
code=000
while :; do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$URL/health" || true)
    [ "$code" = 200 ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -30 "$WORK/serve.log"; die "server exited before /health was 200"; }
    waited=$(($(date +%s) - S0))
    [ "$waited" -ge "$START_TIMEOUT" ] && { tail -30 "$WORK/serve.log"; die "/health not 200 after ${waited}s (last: $code)"; }
    [ $((waited % 10)) -lt 2 ] && info "${waited}s: /health -> $code"
    sleep 2
done
READY_S=$(($(date +%s) - S0))
info "healthy after ${READY_S}s"

# --- checks -----------------------------------------------------------------------------------------------
step "checks from outside the container"
body=$(curl -fsS --max-time 10 "$URL/health") || die "GET /health failed"
info "GET /health -> 200 $body"
ready=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$URL/ready" || true)
info "GET /ready -> $ready"
gen=$(curl -fsS --max-time 120 -H 'Content-Type: application/json' \
    -d '{"inputs": "The list", "parameters": {"max_new_tokens": 20}}' "$URL/generate") \
    || die "POST /generate failed"
"$HOST_PY" -c 'import json, sys; d = json.loads(sys.argv[1]); d = d[0] if isinstance(d, list) else d; \
assert isinstance(d.get("generated_text"), str), d' "$gen" || die "/generate answered without generated_text: $gen"
info "POST /generate -> ${gen:0:200}"
metrics=$(curl -fsS --max-time 10 "$URL/metrics") || die "GET /metrics failed"
grep -q '^textgen_requests_total' <<<"$metrics" || die "/metrics has no textgen_requests_total"
info "GET /metrics -> $(grep -c '^textgen_' <<<"$metrics") textgen_* samples"
# every metric the Grafana dashboard queries is exported (HELP lines name families even before samples)
absent=$("$HOST_PY" -c 'import json, re, sys
exprs = [t["expr"] for p in json.load(open(sys.argv[1]))["panels"] for t in p.get("targets", [])]
names = {re.sub(r"_(total|bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"textgen_\w+", e)}
families = set(re.findall(r"^# HELP (textgen_\w+)", sys.stdin.read(), flags=re.M))
print(" ".join(sorted(names - {re.sub(r"_total$", "", f) for f in families})))' \
    deploy/grafana/dashboards/textgen.json <<<"$metrics")
[ -z "$absent" ] || die "/metrics lacks metrics the dashboard queries: $absent"
info "every metric the Grafana dashboard queries is in /metrics"
if [ -n "$HC_ARGV" ]; then
    # The image's own HEALTHCHECK command, run inside a second container on the same (host) network.
    mapfile -t HC <<<"$HC_ARGV"
    HC_CTR=$(buildah from --quiet "$IMAGE")
    if buildah run --isolation chroot --user "$USER_CFG" --env "TEXTGEN_PORT=$PORT" "$HC_CTR" -- "${HC[@]}"; then
        info "image HEALTHCHECK command -> healthy"
    else
        buildah rm "$HC_CTR" >/dev/null; die "the image's HEALTHCHECK command failed against a healthy server"
    fi
    buildah rm "$HC_CTR" >/dev/null
fi

step "stop the server: SIGTERM to the serving process, as a container engine would"
# buildah run -> chroot runtime -> the image's command: signal that last process (the one running
# "${CMD[*]}") rather than buildah, which would kill it outright instead of letting it drain.
descendants() {
    local todo=("$1") child
    while [ ${#todo[@]} -gt 0 ]; do
        for child in $(pgrep -P "${todo[0]}" || true); do echo "$child"; todo+=("$child"); done
        todo=("${todo[@]:1}")
    done
}
target=""
for pid in $(descendants "$SERVER_PID"); do
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "${CMD[-1]}"; then target=$pid; fi
done
if [ -n "$target" ]; then
    info "SIGTERM to pid $target ($(tr '\0' ' ' <"/proc/$target/cmdline" | cut -c1-60))"
    kill -TERM "$target"
else
    info "serving process not found; SIGTERM to the process group"
    kill -TERM -- "-$SERVER_PID"
fi
STOP0=$(date +%s)
for _ in $(seq 1 120); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
if kill -0 "$SERVER_PID" 2>/dev/null; then
    info "still running after 60s; killing it"
else
    info "exited after $(($(date +%s) - STOP0))s; its last log lines:"
    tail -4 "$WORK/serve.log" | sed 's/^/      /'
fi
cleanup
SERVER_PID=""
trap - EXIT

step "summary"
info "image:        $IMAGE (base $BASE_IMAGE)"
info "image size:   $SIZE"
info "build time:   ${BUILD_S}s ($([ "${SMOKE_NO_CACHE:-0}" = 1 ] && echo 'no cache' || echo 'layer cache allowed'))"
info "start time:   ${READY_S}s until /health was 200"
info "checks:       /health 200, /ready $ready, /generate ok, /metrics ok"
echo "container-smoke: OK"
