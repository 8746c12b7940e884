#!/usr/bin/env bash
# Offline proof of persona's container images, end to end, on a machine that reaches no image registry
# (Docker Hub, nvcr.io) — only Debian's apt mirror and PyPI (or a local wheel mirror):
#
#   1. docker.io and debootstrap from apt (if missing); a private dockerd (own socket, data-root, exec-root,
#      pidfile; no bridge, no iptables) on overlay2, else vfs;
#   2. a base image without a registry: debootstrap --variant=minbase --include=python3,python3-venv bookworm,
#      tarred into `docker import` as persona-local/bookworm-python:12 (tarball cached);
#   3. a wheelhouse downloaded on the host (`pip wheel`: torch, persona's wheel, every dependency; cp311, like
#      bookworm's python3);
#   4. `docker build --network none` of deploy/docker/Dockerfile (services), Dockerfile.train and
#      Dockerfile.triton against that base and wheelhouse (train and triton in parallel with services);
#   5. the services image run with `--network none --read-only` (uid 10001, tmpfs /data /models /tmp, its own
#      CMD: `persona-cli serve … --auth api-key`) until `docker inspect` reports its HEALTHCHECK healthy, then
#      `docker exec … python -m persona.services.runtime.healthcheck` must exit 0; SIGTERM must stop it cleanly;
#      the train image likewise; the triton image: persona/torch/diffusers/onnxruntime importable by its system
#      python3 (what the python backend embeds) and, with the tritonserver bundled in nvidia-pytriton standing
#      in for NVIDIA's, its HEALTHCHECK (/v2/health/ready) healthy;
#   6. cleanup: containers, dockerd, its mounts and the work dir (unless --keep).
#
# Every check prints `RESULT <name>=<value>` lines on stdout (tests/deploy/test_images.py reads them); the last
# line is `RESULT ok=1` on success. Exit status 0 only if every check passed.
#
# Usage: deploy/docker/offline_build.sh [--keep] [--only services]
# Environment: PERSONA_IMAGES_CACHE (default ~/.cache/persona-images: base tarball), PERSONA_IMAGES_TMP (where
# the work dir goes, default /var/tmp), PYTHON (host python with pip, default python3; must be 3.11 like
# bookworm), PERSONA_DEBIAN_MIRROR (default http://deb.debian.org/debian), TORCH_VERSION (default 2.13.0).
# Needs root (apt, dockerd, debootstrap).
set -Eeuo pipefail

KEEP=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1 ;;
    --only) ONLY="$2"; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${PERSONA_IMAGES_CACHE:-${HOME:-/root}/.cache/persona-images}"
PYTHON="${PYTHON:-python3}"
MIRROR="${PERSONA_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
SUITE=bookworm
BASE_TAG="persona-local/bookworm-python:12"
TAG="0.1.0-offline"
T0=$(date +%s)

log() { printf '[offline_build %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
result() { printf 'RESULT %s=%s\n' "$1" "$2"; }
die() { log "FAILED: $*"; result failed "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (apt-get, dockerd, debootstrap); run it as root or with sudo"

# ---------------------------------------------------------------------------------------------------------
# 1. tools
need_pkgs=()
command -v dockerd >/dev/null 2>&1 || need_pkgs+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need_pkgs+=(debootstrap)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "apt-get install ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >"${CACHE%/}.apt.log" 2>&1; then
    apt-get update -q >>"${CACHE%/}.apt.log" 2>&1 || true
    apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >>"${CACHE%/}.apt.log" 2>&1 \
      || { tail -20 "${CACHE%/}.apt.log" >&2; die "apt-get install ${need_pkgs[*]} failed"; }
  fi
fi
# The Debian client matches the Debian daemon (20.10); another `docker` on PATH may be a newer CLI.
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER="$(command -v docker)" || die "no docker client after installing docker.io"
result docker_version "$(dockerd --version | sed 's/,.*//; s/^Docker version //')"

mkdir -p "$CACHE"
TMPROOT="${PERSONA_IMAGES_TMP:-/var/tmp}"
mkdir -p "$TMPROOT"
WORK="$(mktemp -d "$TMPROOT/persona-images.XXXXXX")"
# exec-root holds unix sockets (< 108 bytes), so it stays short.
EXECROOT="$(mktemp -d /tmp/pimg.XXXXXX)"
export DOCKER_HOST="unix://$WORK/docker.sock"
export DOCKER_BUILDKIT=0
DOCKERD_PID=""
CONTAINERS=()

cleanup() {
  local rc=$?
  set +e
  if [ -n "$DOCKERD_PID" ]; then
    for c in "${CONTAINERS[@]}"; do "$DOCKER" rm -f "$c" >/dev/null 2>&1; done
    if [ "$KEEP" = 1 ]; then
      log "--keep: dockerd (pid $DOCKERD_PID) left running: DOCKER_HOST=$DOCKER_HOST; work dir $WORK"
      exit $rc
    fi
    kill -TERM "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID" 2>/dev/null
    wait "$DOCKERD_PID" 2>/dev/null
  fi
  [ "$KEEP" = 1 ] && exit $rc
  # Anything dockerd left mounted under its roots (overlay layers, shm) goes before the files.
  for root in "$WORK" "$EXECROOT"; do
    awk -v r="$root" '$2 ~ "^"r {print $2}' /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
  done
  rm -rf "$WORK" "$EXECROOT"
  log "cleaned up (rc=$rc)"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_dockerd() {
  local driver="$1"
  log "starting dockerd (storage driver $driver)"
  dockerd --host "$DOCKER_HOST" --data-root "$WORK/docker" --exec-root "$EXECROOT" --pidfile "$WORK/dockerd.pid" \
    --bridge=none --iptables=false --ip6tables=false --ip-masq=false --userland-proxy=false \
    --storage-driver="$driver" --log-level=warn >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 1 60); do
    "$DOCKER" version >/dev/null 2>&1 && return 0
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 0.5
  done
  log "dockerd ($driver) did not come up:"; tail -5 "$WORK/dockerd.log" >&2
  kill -TERM "$DOCKERD_PID" 2>/dev/null; wait "$DOCKERD_PID" 2>/dev/null
  DOCKERD_PID=""
  return 1
}
start_dockerd overlay2 || { rm -rf "$WORK/docker"; start_dockerd vfs; } || die "dockerd starts with neither overlay2 nor vfs (log: $WORK/dockerd.log)"
result storage_driver "$("$DOCKER" info --format '{{.Driver}}')"
result cgroup "$("$DOCKER" info --format '{{.CgroupDriver}} v{{.CgroupVersion}}')"

# ---------------------------------------------------------------------------------------------------------
# 2. the base image: debootstrap minbase + python3 + venv, imported (no registry)
BASE_TAR="$CACHE/${SUITE}-minbase-python3.tar"
if [ ! -s "$BASE_TAR" ]; then
  t=$(date +%s)
  log "debootstrap --variant=minbase --include=python3,python3-venv $SUITE ($MIRROR)"
  debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$WORK/rootfs" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"* "$WORK/rootfs/tmp/"*
  : >"$WORK/rootfs/etc/resolv.conf"
  tar --numeric-owner -C "$WORK/rootfs" -cf "$BASE_TAR.part" .
  mv "$BASE_TAR.part" "$BASE_TAR"
  rm -rf "$WORK/rootfs"
  result debootstrap_s $(( $(date +%s) - t ))
else
  log "base tarball cached: $BASE_TAR"
  result debootstrap_s cached
fi
"$DOCKER" import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' "$BASE_TAR" "$BASE_TAG" >/dev/null || die "docker import of $BASE_TAR failed"
result base_image "$BASE_TAG ($("$DOCKER" run --rm --network none "$BASE_TAG" python3 -c 'import sys; print("python", sys.version.split()[0])'))"

# ---------------------------------------------------------------------------------------------------------
# 3. the build context: the repository's files (tracked + untracked, not ignored) plus a wheelhouse
CTX="$WORK/context"
mkdir -p "$CTX"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
    | tar --null -T - -cf -) | tar -C "$CTX" -xf -
else
  tar -C "$REPO" --exclude=.git --exclude=.venv --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$CTX" -xf -
fi
pyver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
imgver="$("$DOCKER" run --rm --network none "$BASE_TAG" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ "$pyver" = "$imgver" ] || die "the host's $PYTHON is $pyver but the image's python3 is $imgver: wheels downloaded here would not fit; set PYTHON to a python$imgver with pip"
t=$(date +%s)
log "pip wheel: torch==$TORCH_VERSION, persona and its dependencies → wheelhouse"
(cd "$CTX" && "$PYTHON" -m pip wheel -q --disable-pip-version-check -w "$CTX/wheelhouse" "torch==$TORCH_VERSION" ".[postgres,kubernetes]" \
  >"$WORK/pip-wheel.log" 2>&1) || { tail -20 "$WORK/pip-wheel.log" >&2; die "pip wheel failed (host index/PyPI)"; }
# The stand-in for NVIDIA's tritonserver in the triton image's proof (not a persona dependency: --no-deps, its
# metadata pins numpy < 2); Dockerfile.triton installs it when the wheelhouse has it.
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps -d "$CTX/wheelhouse" nvidia-pytriton==0.7.0 \
  >>"$WORK/pip-wheel.log" 2>&1 || { tail -20 "$WORK/pip-wheel.log" >&2; die "pip download nvidia-pytriton failed"; }
rm -rf "$CTX/build" "$CTX"/*.egg-info
ls "$CTX/wheelhouse" | sed -n 's/^\([^-]*\)-\([^-]*\)-.*\.whl$/\1==\2/p' | sort >"$CTX/wheelhouse/constraints.txt"
result wheelhouse "$(ls "$CTX/wheelhouse"/*.whl | wc -l) wheels, $(du -sm "$CTX/wheelhouse" | cut -f1) MB, $(( $(date +%s) - t ))s"

# ---------------------------------------------------------------------------------------------------------
# 4. builds, all `--network none`
build() {  # build NAME DOCKERFILE BASE_ARG
  local name="$1" dockerfile="$2" base_arg="$3" t rc
  t=$(date +%s)
  "$DOCKER" build --network none --force-rm -f "$CTX/deploy/docker/$dockerfile" \
    --build-arg "$base_arg=$BASE_TAG" --build-arg WHEELHOUSE=wheelhouse --build-arg "TORCH_VERSION=$TORCH_VERSION" \
    -t "persona-local/$name:$TAG" "$CTX" >"$WORK/build-$name.log" 2>&1 && rc=0 || rc=$?
  echo "$rc $(( $(date +%s) - t ))" >"$WORK/build-$name.status"
  return $rc
}
build_result() {  # build_result NAME → RESULT lines; non-zero if the build failed
  local name="$1" rc s
  read -r rc s <"$WORK/build-$name.status"
  if [ "$rc" != 0 ]; then
    log "build of $name failed (rc $rc); the end of its log:"; tail -25 "$WORK/build-$name.log" >&2
    result "build_$name" "failed"
    return 1
  fi
  result "build_$name" "ok ${s}s $("$DOCKER" image inspect -f '{{.Size}}' "persona-local/$name:$TAG" | awk '{printf "%d MB", $1/1048576}')"
}

PIDS=()
want() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
if want train; then log "building train (background)"; build train Dockerfile.train CUDA_BASE_IMAGE & PIDS+=($!); fi
if want triton; then log "building triton (background)"; build triton Dockerfile.triton TRITON_BASE_IMAGE & PIDS+=($!); fi
log "building services"
build services Dockerfile BASE_IMAGE || true
build_result services || die "docker build --network none of deploy/docker/Dockerfile failed (log above)"

# ---------------------------------------------------------------------------------------------------------
# 5a. the services image
check_image_config() {  # user, no secrets in env, no sources
  local img="$1" user env
  user="$("$DOCKER" image inspect -f '{{.Config.User}}' "$img")"
  [ "$user" = "10001:10001" ] || die "$img runs as '$user', not 10001:10001"
  env="$("$DOCKER" image inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$img")"
  if printf '%s\n' "$env" | grep -Eiq '^[^=]*(KEY|TOKEN|SECRET|PASSWORD)[^=]*='; then
    die "$img has a secret-looking variable baked in: $(printf '%s\n' "$env" | grep -Ei '^[^=]*(KEY|TOKEN|SECRET|PASSWORD)' | cut -d= -f1)"
  fi
  "$DOCKER" run --rm --network none --entrypoint /bin/sh "$img" -c 'test ! -e /src && test ! -d /wheelhouse' \
    || die "$img still holds the build context (/src)"
}

run_and_wait_healthy() {  # run_and_wait_healthy NAME IMAGE [CMD...] → waits for HEALTHCHECK healthy
  local name="$1" img="$2" t status ro=--read-only
  shift 2
  [ "${READONLY:-1}" = 1 ] || ro=""
  t=$(date +%s)
  CONTAINERS+=("$name")
  "$DOCKER" run -d --name "$name" --network none $ro --cap-drop ALL --security-opt no-new-privileges \
    --tmpfs /tmp --tmpfs /data:uid=10001,gid=10001,mode=0750 --tmpfs /models:uid=10001,gid=10001,mode=0750 \
    --health-interval 2s --health-timeout 10s --health-start-period 180s --health-retries 3 \
    "$img" "$@" >/dev/null || die "docker run $img failed"
  for _ in $(seq 1 180); do
    status="$("$DOCKER" inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.State.Status}}' "$name")"
    case "$status" in
      healthy*) break ;;
      *exited*|*dead*|unhealthy*) break ;;
    esac
    sleep 1
  done
  if [[ "$status" != healthy* ]]; then
    log "$name is '$status'; its logs and health log:"
    "$DOCKER" logs --tail 30 "$name" >&2 2>&1
    "$DOCKER" inspect -f '{{json .State.Health}}' "$name" >&2
    die "$name ($img) never became healthy ($status)"
  fi
  result "${name}_healthy_after_s" $(( $(date +%s) - t ))
}

IMG="persona-local/services:$TAG"
result services_healthcheck_cmd "$("$DOCKER" image inspect -f '{{json .Config.Healthcheck.Test}}' "$IMG")"
result services_user "$("$DOCKER" image inspect -f '{{.Config.User}}' "$IMG")"
check_image_config "$IMG"
log "running the services image (--network none, read-only root, its own CMD)"
run_and_wait_healthy persona-services "$IMG"
result services_health_status "$("$DOCKER" inspect -f '{{.State.Health.Status}}' persona-services)"
out="$("$DOCKER" exec persona-services python -m persona.services.runtime.healthcheck 2>&1)" \
  || die "docker exec … healthcheck failed: $out"
result services_exec_healthcheck "$out (rc=0)"
# The optional parts the chart uses: the Postgres store and the Kubernetes train dispatcher's client.
out="$("$DOCKER" exec persona-services python -c 'import psycopg, psycopg_pool, kubernetes; print("postgres+kubernetes ok")' 2>&1)" \
  || die "the services image lacks persona[postgres,kubernetes]: $out"
result services_extras "$out"
out="$("$DOCKER" exec persona-services python -m persona.services.runtime.healthcheck --service persona.v1.SubjectService 2>&1)" \
  || die "healthcheck --service persona.v1.SubjectService failed: $out"
if out="$("$DOCKER" exec persona-services python -m persona.services.runtime.healthcheck --address 127.0.0.1:1 --timeout 2 2>&1)"; then
  die "the health check passed against a closed port"
fi
result services_exec_healthcheck_closed_port "$out"
t=$(date +%s)
"$DOCKER" stop -t 30 persona-services >/dev/null
result services_stop "exit=$("$DOCKER" inspect -f '{{.State.ExitCode}}' persona-services) after $(( $(date +%s) - t ))s"

# ---------------------------------------------------------------------------------------------------------
# 5b. train and triton (built in the background meanwhile)
FAILED=0
for pid in "${PIDS[@]}"; do wait "$pid" || true; done
if want train; then
  if build_result train; then
    IMG="persona-local/train:$TAG"
    check_image_config "$IMG"
    run_and_wait_healthy persona-train "$IMG"
    out="$("$DOCKER" exec persona-train python -m persona.services.runtime.healthcheck 2>&1)" || die "train: healthcheck: $out"
    result train_exec_healthcheck "$out (rc=0)"
    "$DOCKER" rm -f persona-train >/dev/null
  else
    FAILED=1
  fi
fi
if want triton; then
  if build_result triton; then
    IMG="persona-local/triton:$TAG"
    check_image_config "$IMG"
    # What the python backend's stub does: the image's python3 (not the venv's) importing persona's models.
    out="$("$DOCKER" run --rm --network none "$IMG" python3 -c 'import sys, persona.model_repository, persona.services.generate.triton_models, torch, diffusers, onnxruntime; print(sys.executable, "imports persona, torch", torch.__version__, "diffusers", diffusers.__version__, "onnxruntime", onnxruntime.__version__)' 2>&1)" \
      || die "triton: the system python3 cannot import persona's python-backend models: $out"
    result triton_python_imports "$out"
    # No NVIDIA tritonserver offline: the one bundled in nvidia-pytriton (python backend) serves an empty
    # explicit-mode repository on :8000/:8001/:8002, and the image's own HEALTHCHECK must call it ready.
    # Read-only root, as the chart runs it: persona prepares the bundled python-backend stub in $HOME/.cache (/tmp)
    # when site-packages cannot be written. NVIDIA's image needs no such copy.
    run_and_wait_healthy persona-triton "$IMG" python3 -c '
import signal, time
from pathlib import Path
from persona.services.generate.triton_server import TritonServer
server = TritonServer(Path("/models"), grpc_port=8001, http_port=8000, metrics_port=8002, log_file="/tmp/triton.log")
server.start(timeout_s=120)
print("tritonserver ready:", " ".join(server.command()[:1]), flush=True)
signal.signal(signal.SIGTERM, lambda *a: (server.stop(), exit(0)))
while True:
    time.sleep(3600)
'
    result triton_health_status "$("$DOCKER" inspect -f '{{.State.Health.Status}}' persona-triton) (bundled pytriton tritonserver, /v2/health/ready)"
    "$DOCKER" rm -f persona-triton >/dev/null
  else
    FAILED=1
  fi
fi

[ "$FAILED" = 0 ] || die "a train or triton image did not build (logs above)"
result disk_mb "$(du -sm "$WORK" 2>/dev/null | cut -f1) work dir (images, layers, context), $(du -sm "$CACHE" | cut -f1) cache"
result total_s $(( $(date +%s) - T0 ))
result ok 1
