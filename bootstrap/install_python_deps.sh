#!/bin/bash
# EMR bootstrap action: builds the Spark jobs' Python environment on every node, before YARN starts.
#
#   install_python_deps.sh REQUIREMENTS_S3_URI VENV_DIR [PIP_INDEX_URL]
#
# Why a Python 3.11 venv: EMR 7.x runs Amazon Linux 2023, whose system Python is 3.9 and which also ships
# 3.11 (EMR 7.1 and later). The versions the jobs are tested with (numpy 2.4, pyarrow 26, pillow 13,
# keras 3.15, TensorFlow 2.21) need Python >= 3.11, so the jobs run on 3.11, in their own venv, leaving
# the system Python that EMR's own tools use untouched. Spark is told to use it by the step's
# spark.pyspark.python (plugins/fruits/tuning.py emr_tuning).
#
# Exactly the lock: REQUIREMENTS is `make emr-requirements`' export of uv.lock's "emr" group, every
# transitive package pinned with its hashes, so pip runs in hash-checking mode and resolves nothing
# itself. pip is upgraded first, to the version pinned in that same file (hash-checked too): the venv's
# own pip is whatever the OS package ships. Wheels only (--only-binary): nothing compiles on the nodes, and
# a missing wheel fails the bootstrap (so the cluster) at once instead of half-installing.
#
# The package index: the public one through the subnet's NAT gateway, or the mirror given as the third
# argument. A bootstrap action gets no environment from the request (and sudo would drop it), which is
# why the mirror is an argument (FRUITS_EMR_PIP_INDEX_URL on the Airflow side), not PIP_INDEX_URL.
set -euo pipefail

usage="usage: install_python_deps.sh REQUIREMENTS_S3_URI VENV_DIR [PIP_INDEX_URL]"
requirements_uri="${1:?$usage}"
venv="${2:?$usage}"
index_url="${3:-}"
log() { echo "[fruits-bootstrap] $(date -u +%H:%M:%S) $*"; }

pip_args=(--quiet --no-cache-dir --disable-pip-version-check --only-binary=:all: --require-hashes)
if [[ -n "$index_url" ]]; then
    pip_args+=(--index-url "$index_url")
    log "package index: $index_url"
fi

if ! python3.11 -m venv --help >/dev/null 2>&1; then
    log "installing python3.11"
    sudo dnf install -y -q python3.11 python3.11-pip
fi
log "creating $venv with $(python3.11 --version)"
sudo python3.11 -m venv "$venv"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
aws s3 cp --only-show-errors "$requirements_uri" "$tmp/requirements.txt"

# pip's own entry (its line and the hash lines continuing it), for the upgrade that comes first.
awk '/^pip==/ {keep = 1} keep {print} keep && !/\\$/ {exit}' "$tmp/requirements.txt" >"$tmp/pip.txt"
if ! grep -q '^pip==' "$tmp/pip.txt"; then
    log "no pinned pip in $requirements_uri: export it with make emr-requirements"
    exit 1
fi
log "upgrading pip to $(head -1 "$tmp/pip.txt" | cut -d' ' -f1)"
sudo "$venv/bin/python" -m pip install "${pip_args[@]}" --no-deps -r "$tmp/pip.txt"

log "installing $(grep -c '==' "$tmp/requirements.txt") pinned packages, hashes checked"
sudo "$venv/bin/python" -m pip install "${pip_args[@]}" --no-deps -r "$tmp/requirements.txt"
sudo "$venv/bin/python" -m pip check

# Fail the bootstrap here, not later in a Spark task, if an import is broken on this node.
"$venv/bin/python" - <<'PY'
import h5py, keras, matplotlib, numpy, obstore, onnxruntime, pandas, PIL, pyarrow, tensorflow
print("[fruits-bootstrap] ok:", "tensorflow", tensorflow.__version__, "numpy", numpy.__version__,
      "pandas", pandas.__version__, "pyarrow", pyarrow.__version__)
PY
