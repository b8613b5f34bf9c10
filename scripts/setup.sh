#!/usr/bin/env bash
# Installs everything gammaray needs to build and test on a fresh Debian machine, idempotently.
# Runs in seconds when everything is already in place. Must run before any cargo command:
# RUSTUP_AUTO_INSTALL=0 on these machines means the pinned toolchain is never fetched implicitly.
set -euo pipefail

TOOLCHAIN="nightly-2026-07-01"
BPF_LINKER_VERSION="0.13.0"
OHA_VERSION="1.16.0"
LLVM_MAJOR="22"

log() { printf '\033[1msetup:\033[0m %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "must run as root (it installs Debian packages); rerun with sudo"
  exit 1
fi

export PATH="$HOME/.cargo/bin:$PATH"

# Debian packages: LLVM for bpf-linker, iproute2 for network namespaces, iperf3 for the bulk
# throughput benchmark, valgrind for the benchmark's instruction counts, xz-utils to unpack the
# envtest assets.
need_pkgs=()
for p in "llvm-${LLVM_MAJOR}-dev" iproute2 procps iperf3 valgrind xz-utils; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  log "installing Debian packages: ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# The pinned toolchain (rust-toolchain.toml names the same one).
if ! rustup toolchain list | grep -q "^${TOOLCHAIN}"; then
  log "installing toolchain ${TOOLCHAIN}"
  rustup toolchain install "${TOOLCHAIN}" --profile minimal -c rust-src -c rustfmt -c clippy -c llvm-tools
else
  for c in rust-src rustfmt clippy llvm-tools; do
    rustup component list --toolchain "${TOOLCHAIN}" --installed | grep -q "^${c}" \
      || rustup component add --toolchain "${TOOLCHAIN}" "$c"
  done
fi

# bpf-linker, built against the same LLVM major as the pinned rustc.
if ! bpf-linker --version 2>/dev/null | grep -q "${BPF_LINKER_VERSION}"; then
  log "installing bpf-linker ${BPF_LINKER_VERSION} against LLVM ${LLVM_MAJOR} (about 70 s)"
  LLVM_PREFIX="/usr/lib/llvm-${LLVM_MAJOR}" cargo "+${TOOLCHAIN}" install bpf-linker --locked \
    --version "${BPF_LINKER_VERSION}" --no-default-features --features "llvm-${LLVM_MAJOR}"
fi

# oha, the HTTP load generator of the benchmarks (fixed-rate mode, JSON output).
if ! oha --version 2>/dev/null | grep -q "${OHA_VERSION}"; then
  log "installing oha ${OHA_VERSION} (a few minutes)"
  cargo "+${TOOLCHAIN}" install oha --locked --version "${OHA_VERSION}"
fi

# kube-apiserver and etcd for the tests against a real API server (the envtest layout,
# KUBEBUILDER_ASSETS), unpacked from the shared directory beside the project into a cache named by
# the archive's checksum; `current` points at the one in use. kubectl comes with these machines.
ENVTEST_SRC="${GAMMARAY_ENVTEST_SRC:-$(cd "$(dirname "$0")/../.." && pwd)/shared/envtest}"
ENVTEST_CACHE="/var/cache/gammaray/envtest"
if [ -f "${ENVTEST_SRC}/assets.tar.xz" ]; then
  sum="$(sha256sum "${ENVTEST_SRC}/assets.tar.xz" | cut -c1-16)"
  dest="${ENVTEST_CACHE}/${sum}"
  if [ ! -x "${dest}/bin/kube-apiserver" ] || [ ! -x "${dest}/bin/etcd" ]; then
    log "unpacking kube-apiserver and etcd from ${ENVTEST_SRC} into ${dest}"
    rm -rf "${dest}.tmp" && mkdir -p "${dest}.tmp"
    tar -xJf "${ENVTEST_SRC}/assets.tar.xz" -C "${dest}.tmp"
    rm -rf "${dest}" && mv "${dest}.tmp" "${dest}"
  fi
  ln -sfn "${dest}/bin" "${ENVTEST_CACHE}/current"
else
  log "no envtest assets at ${ENVTEST_SRC}: the tests against a real API server will SKIP (CI fails them)"
fi
command -v kubectl >/dev/null || log "kubectl is not on PATH: the tests against a real API server need it"

log "ready: ${TOOLCHAIN}, bpf-linker ${BPF_LINKER_VERSION}, LLVM ${LLVM_MAJOR}, oha ${OHA_VERSION}, envtest assets in ${ENVTEST_CACHE}/current"
