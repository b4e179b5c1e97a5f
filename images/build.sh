#!/usr/bin/env bash
# Build the curate stage images: images/build.sh [cpu|gpu|base|all]...   (default: cpu)
#
#   base  localhost/curate-base:bookworm, a Debian bookworm root filesystem (debootstrap, cached) with
#         python3.11 -- only when no registry is reachable, i.e. when BASE_IMAGE is not given.
#   cpu   ${REGISTRY}/curate-cpu:${VERSION}   slim, no torch: ingest, score_length, judge_*, generate_*,
#         select, export, plan_batches
#   gpu   ${REGISTRY}/curate-gpu:${VERSION}   + torch/open_clip/transformers: score_clip, score_reward
#
# Engine: docker when a daemon answers, else buildah (--isolation chroot; root, no daemon).
# Python dependencies are resolved on the host into a wheelhouse (pip wheel -r ... -c constraints.txt)
# and installed in the build with --no-index: the build needs no network, and the wheels are exactly
# the versions constraints.txt pins.
#
# Environment (all optional):
#   REGISTRY      image name prefix                  (default: localhost)
#   VERSION       image tag and OCI version label    (default: pyproject.toml's version)
#   REVISION      OCI revision label                 (default: git rev-parse HEAD, +dirty)
#   BASE_IMAGE    base for cpu and gpu images        (default: the local Debian base, built if missing)
#   GPU_BASE_IMAGE  base for the gpu image only, e.g. a CUDA PyTorch image (default: BASE_IMAGE)
#   CACHE_DIR     rootfs and wheelhouse cache        (default: ~/.cache/curate-images)
#   PYTHON        host interpreter for the wheelhouse, same minor as the base (default: .venv/bin/python)
#   ENGINE        docker | buildah                   (default: auto)
#   PUSH=1        push the built images
# Prints one line per built image: "built <name> <seconds>s".
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CACHE_DIR=${CACHE_DIR:-$HOME/.cache/curate-images}
REGISTRY=${REGISTRY:-localhost}
VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)}
REVISION=${REVISION:-$(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- libcurate jobs images 2>/dev/null || echo +dirty)}
CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
LOCAL_BASE=localhost/curate-base:bookworm
BASE_PY=3.11            # python3 of Debian bookworm; the wheelhouse must match it
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

die() { echo "build.sh: $*" >&2; exit 1; }

pick_engine() {
  if [[ -n "${ENGINE:-}" ]]; then echo "$ENGINE"; return; fi
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker; return; fi
  if command -v buildah >/dev/null; then echo buildah; return; fi
  die "no container engine: need a running docker daemon or buildah (apt-get install -y buildah podman)"
}
ENGINE=$(pick_engine)

image_exists() {
  if [[ $ENGINE == docker ]]; then docker image inspect "$1" >/dev/null 2>&1
  else buildah inspect --type image "$1" >/dev/null 2>&1; fi
}

# --- base: a debootstrapped Debian root filesystem imported as an image -------------------------
build_base() {
  if image_exists "$LOCAL_BASE" && [[ -z "${REBUILD_BASE:-}" ]]; then
    echo "base $LOCAL_BASE exists"; return
  fi
  local t0=$SECONDS tarball=$CACHE_DIR/rootfs-bookworm.tar
  mkdir -p "$CACHE_DIR"
  if [[ ! -s $tarball ]]; then
    command -v debootstrap >/dev/null || die "no base image and no debootstrap (apt-get install -y debootstrap)"
    [[ $(id -u) == 0 ]] || die "debootstrap needs root"
    local rootfs=$CACHE_DIR/rootfs-bookworm.tmp
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$CACHE_DIR/debootstrap.log" 2>&1 \
      || die "debootstrap failed, see $CACHE_DIR/debootstrap.log"
    # Slim: package caches, indexes, docs and locales are dead weight in a batch image.
    rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
           "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*
    tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  if [[ $ENGINE == docker ]]; then
    docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' "$tarball" "$LOCAL_BASE" >/dev/null
  else
    local ctr
    ctr=$(buildah from scratch)
    buildah add --quiet "$ctr" "$tarball" / >/dev/null
    buildah config --env LANG=C.UTF-8 --cmd /bin/bash \
      --label org.opencontainers.image.title=curate-base \
      --label org.opencontainers.image.description="Debian bookworm minbase + python3 (debootstrap)" "$ctr"
    buildah commit --quiet --rm "$ctr" "$LOCAL_BASE" >/dev/null
  fi
  echo "built $LOCAL_BASE $((SECONDS - t0))s"
}

# --- wheelhouse on the host, staged build context ------------------------------------------------
wheelhouse() {  # $1: requirements file (images/requirements-*.txt); prints the wheelhouse dir
  local req=$1 dir=$CACHE_DIR/wheels-py$BASE_PY
  local pyv
  pyv=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  [[ $pyv == "$BASE_PY" ]] || die "PYTHON=$PYTHON is $pyv; the base has python $BASE_PY (wheel tags must match)"
  mkdir -p "$dir"
  # pip wheel reuses wheels already in the directory (find-links), so a warm cache is offline and fast.
  "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-index --find-links "$dir" -w "$dir" \
    -r "$req" -c constraints.txt >/dev/null 2>&1 \
  || "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --find-links "$dir" -w "$dir" \
    -r "$req" -c constraints.txt >&2
  echo "$dir"
}

stage_context() {  # $1: wheelhouse dir; prints a fresh context dir holding only what the image needs
  local ctx
  ctx=$(mktemp -d "$CACHE_DIR/ctx.XXXXXX")
  mkdir -p "$ctx/images"
  cp images/requirements-*.txt "$ctx/images/"
  cp constraints.txt "$ctx/"
  # Hard links when the cache shares the filesystem, else copies: the wheelhouse can be gigabytes.
  cp -al "$1" "$ctx/wheels" 2>/dev/null || cp -a "$1" "$ctx/wheels"
  tar --exclude=__pycache__ --exclude='*.pyc' -cf - libcurate jobs | tar -C "$ctx" -xf -
  echo "$ctx"
}

build_image() {  # $1: family (cpu|gpu)
  local fam=$1 base=${BASE_IMAGE:-$LOCAL_BASE} t0=$SECONDS
  [[ $fam == gpu ]] && base=${GPU_BASE_IMAGE:-$base}
  if [[ $base == "$LOCAL_BASE" ]]; then build_base; fi
  local name=$REGISTRY/curate-$fam:$VERSION
  local wh ctx
  wh=$(wheelhouse "images/requirements-$fam.txt")
  ctx=$(stage_context "$wh")
  local args=(--build-arg "BASE_IMAGE=$base" --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION"
              --build-arg "CREATED=$CREATED" -f "$ROOT/images/$fam/Containerfile" -t "$name")
  if [[ $ENGINE == docker ]]; then
    docker build "${args[@]}" "$ctx"
  else
    buildah bud --isolation chroot --layers "${args[@]}" "$ctx"
  fi
  rm -rf "$ctx"
  if [[ -n "${PUSH:-}" ]]; then
    if [[ $ENGINE == docker ]]; then docker push "$name"; else buildah push "$name"; fi
  fi
  echo "built $name $((SECONDS - t0))s"
}

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(cpu)
for t in "${targets[@]}"; do
  case $t in
    base) build_base ;;
    cpu|gpu) build_image "$t" ;;
    all) build_image cpu; build_image gpu ;;
    *) die "unknown target $t (want cpu, gpu, base or all)" ;;
  esac
done
