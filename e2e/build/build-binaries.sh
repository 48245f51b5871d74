#!/usr/bin/env bash
# Builds the local control-plane binaries (kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl, etcd, kwok, helm) from Go modules, at the versions pinned in versions.env, into a cache
# directory keyed by those versions:
#
#     ${UCM_BIN_CACHE:-$HOME/.cache/ucm/bin}/<key>/
#
# The cache lives outside the clone so that a fresh clone on the same machine (CI) reuses it; a
# binary is rebuilt only when it is missing there. Go's own module and build caches are the
# defaults, so even a rebuild after deleting the cache directory is mostly cache hits.
#
# Why build from source at all: the only registry reachable here is the Go module proxy, and it
# gives us exactly the upstream code at a pinned tag, compiled by the local Go toolchain.
#
# The Kubernetes binaries come from a wrapper module (kube/) that requires k8s.io/kubernetes and
# replaces every k8s.io/* staging module with the matching v0.X.Y release, because the
# k8s.io/kubernetes go.mod points them at ./staging paths that the module zip does not contain.
# All four are built by one `go build` so shared packages compile once.
#
# Usage: build-binaries.sh            build what is missing, print the directory last
#        build-binaries.sh --print-dir print the directory only
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$HERE/versions.env"

KEY="k8s-${KUBERNETES_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_helm-${HELM_VERSION}"
OUT="${UCM_BIN_CACHE:-$HOME/.cache/ucm/bin}/$KEY"
if [[ "${1:-}" == "--print-dir" ]]; then
  echo "$OUT"
  exit 0
fi

KUBE_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
ALL_BINS=("${KUBE_BINS[@]}" etcd kwok helm)
MIN_GO_MINOR=26

missing() {  # prints the names of the requested binaries that are not in $OUT yet
  local b
  for b in "$@"; do [[ -x "$OUT/$b" ]] || echo "$b"; done
}

if [[ -z "$(missing "${ALL_BINS[@]}")" ]]; then
  echo "control-plane binaries are up to date ($KEY)"
  echo "$OUT"
  exit 0
fi

die() { echo "build-binaries: $*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "the Go toolchain is not on PATH; install Go >= 1.$MIN_GO_MINOR (https://go.dev/dl)"
GO_VERSION="$(go env GOVERSION)"
go_minor="$(sed -E 's/^go1\.([0-9]+).*/\1/' <<<"$GO_VERSION")"
[[ "$go_minor" =~ ^[0-9]+$ && "$go_minor" -ge "$MIN_GO_MINOR" ]] \
  || die "Go >= 1.$MIN_GO_MINOR is needed to build Kubernetes $KUBERNETES_VERSION; found $GO_VERSION"

# Static binaries (what upstream ships), no VCS stamping of our repository into them, and no local
# paths baked in; -s -w drops debug info, which also makes linking these large binaries faster.
export CGO_ENABLED=0
export GOFLAGS="-buildvcs=false -trimpath"
LDFLAGS_BASE="-s -w"

log() { printf '%s build-binaries: %s\n' "$(date +%H:%M:%S)" "$*"; }
step() {  # step NAME COMMAND...: runs a command and reports how long it took
  local name="$1"; shift
  local t0=$SECONDS
  log "==> $name"
  "$@"
  log "<== $name done in $((SECONDS - t0))s"
}

mkdir -p "$OUT"
STAGE="$(mktemp -d "$OUT/.stage.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
START=$SECONDS
log "building into $OUT with $GO_VERSION (missing: $(missing "${ALL_BINS[@]}" | tr '\n' ' '))"

# Publishes staged binaries one by one with a rename, so an interrupted build never leaves a
# truncated binary that would count as present next time.
publish() {
  local b
  for b in "$@"; do
    [[ -x "$STAGE/$b" ]] || die "go build did not produce $b"
    mv -f "$STAGE/$b" "$OUT/$b"
  done
}

# (Re)writes kube/go.mod when it does not pin $KUBERNETES_VERSION: the replace list is taken from
# k8s.io/kubernetes' own go.mod (every `k8s.io/X => ./staging/...` line), so a new release that
# adds a staging module needs no edit here.
kube_module() {
  local dir="$HERE/kube"
  if grep -qE "^\s*(require )?k8s\.io/kubernetes $KUBERNETES_VERSION( // indirect)?\$" "$dir/go.mod" 2>/dev/null; then
    return 0
  fi
  log "generating kube/go.mod for k8s.io/kubernetes $KUBERNETES_VERSION"
  local staging_version="v0.${KUBERNETES_VERSION#v1.}"
  local upstream_mod
  mkdir -p "$dir"
  upstream_mod="$(cd "$dir" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" \
    | sed -nE 's/^\s*"GoMod": "(.*)",?$/\1/p')"
  [[ -f "$upstream_mod" ]] || die "could not download k8s.io/kubernetes@$KUBERNETES_VERSION's go.mod"
  local go_line
  go_line="$(sed -nE 's/^go ([0-9.]+)$/\1/p' "$upstream_mod")"
  (
    cd "$dir"
    rm -f go.mod go.sum
    go mod init ucm.dev/e2e/build/kube >/dev/null 2>&1
    go mod edit -go="$go_line" -require="k8s.io/kubernetes@$KUBERNETES_VERSION"
    local m
    for m in $(sed -nE 's#^\s*(k8s\.io/[^ ]+) => \./staging/.*#\1#p' "$upstream_mod"); do
      go mod edit -replace="$m=$m@$staging_version"
    done
    for m in "${KUBE_BINS[@]}"; do go mod edit -tool="k8s.io/kubernetes/cmd/$m"; done
    go mod tidy
  )
}

# The same version variables that Kubernetes' hack/lib/version.sh sets, so `kubectl version`
# and /version report the real release instead of v0.0.0-master. buildDate is the tag's time
# from the module proxy, which keeps the build reproducible.
kube_ldflags() {
  local info minor
  info="$(cd "$HERE/kube" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" \
    | sed -nE 's/^\s*"Info": "(.*)",?$/\1/p')"
  local date
  date="$(sed -nE 's/.*"Time":"([^"]+)".*/\1/p' "$info" 2>/dev/null)"
  minor="$(cut -d. -f2 <<<"$KUBERNETES_VERSION")"
  local flags="$LDFLAGS_BASE" pkg key val
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    for kv in "gitVersion=$KUBERNETES_VERSION" "gitMajor=1" "gitMinor=$minor" \
              "gitTreeState=clean" "buildDate=${date:-1970-01-01T00:00:00Z}"; do
      key="${kv%%=*}"; val="${kv#*=}"
      flags+=" -X $pkg.$key=$val"
    done
  done
  echo "$flags"
}

build_kube() {
  kube_module
  local pkgs=() b
  for b in "${KUBE_BINS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  (cd "$HERE/kube" && go build -ldflags "$(kube_ldflags)" -o "$STAGE/" "${pkgs[@]}")
  # The version ldflags are easy to get silently wrong (a renamed variable is just ignored).
  # (captured first: `grep -q` exits at the first match, and under pipefail kubectl's SIGPIPE on its
  # next line would fail the check at random)
  local reported
  reported="$("$STAGE/kubectl" version --client 2>/dev/null || true)"
  grep -q "Client Version: $KUBERNETES_VERSION\$" <<<"$reported" \
    || die "kubectl does not report $KUBERNETES_VERSION: $(head -1 <<<"$reported")"
  publish "${KUBE_BINS[@]}"
}

# etcd's own main module carries replace directives, so it cannot be `go install`ed; a
# three-line wrapper main (etcd/main.go) calls the server's etcdmain, which is what upstream's
# etcd binary does.
build_etcd() {
  local dir="$HERE/etcd"
  if ! grep -qE "go\.etcd\.io/etcd/server/v3 $ETCD_VERSION\$" "$dir/go.mod" 2>/dev/null; then
    log "updating etcd/go.mod to go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    (cd "$dir" && go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION" && go mod tidy)
  fi
  (cd "$dir" && go build -ldflags "$LDFLAGS_BASE" -o "$STAGE/etcd" .)
  publish etcd
}

build_kwok() {
  (cd "$STAGE" && GOBIN="$STAGE" go install -ldflags "$LDFLAGS_BASE" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION")
  publish kwok
}

build_helm() {
  # Helm's own Makefile sets these; without them `helm version` says only "v3.21" and
  # `helm template` assumes an old default Kubernetes version.
  local hv="helm.sh/helm/v3"
  local flags="$LDFLAGS_BASE -X $hv/internal/version.version=$HELM_VERSION -X $hv/internal/version.gitTreeState=clean"
  flags+=" -X $hv/pkg/lint/rules.k8sVersionMajor=1 -X $hv/pkg/lint/rules.k8sVersionMinor=$(cut -d. -f2 <<<"$KUBERNETES_VERSION")"
  flags+=" -X $hv/pkg/chartutil.k8sVersionMajor=1 -X $hv/pkg/chartutil.k8sVersionMinor=$(cut -d. -f2 <<<"$KUBERNETES_VERSION")"
  (cd "$STAGE" && GOBIN="$STAGE" go install -ldflags "$flags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION")
  publish helm
}

[[ -z "$(missing "${KUBE_BINS[@]}")" ]] || step "kube-apiserver, kube-controller-manager, kube-scheduler, kubectl ($KUBERNETES_VERSION)" build_kube
[[ -z "$(missing etcd)" ]] || step "etcd ($ETCD_VERSION)" build_etcd
[[ -z "$(missing kwok)" ]] || step "kwok ($KWOK_VERSION)" build_kwok
[[ -z "$(missing helm)" ]] || step "helm ($HELM_VERSION)" build_helm

log "all control-plane binaries built in $((SECONDS - START))s"
echo "$OUT"
