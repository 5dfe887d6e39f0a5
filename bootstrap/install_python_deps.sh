#!/bin/bash
# EMR bootstrap action: builds the Spark jobs' Python environment on every node, before YARN starts.
#
#   install_python_deps.sh REQUIREMENTS_S3_URI VENV_DIR
#
# Why a Python 3.11 venv: EMR 7.x runs Amazon Linux 2023, whose system Python is 3.9 and which also ships
# 3.11 (EMR 7.1 and later). The versions the jobs are tested with (numpy 2.4, pyarrow 26, pillow 13,
# keras 3.15, TensorFlow 2.21) need Python >= 3.11, so the jobs run on 3.11, in their own venv, leaving
# the system Python that EMR's own tools use untouched. Spark is told to use it by the step's
# spark.pyspark.python (plugins/fruits/tuning.py emr_tuning).
#
# Wheels only (--only-binary): nothing compiles on the nodes, and a missing wheel fails the bootstrap
# (so the cluster) at once instead of half-installing. The nodes need outbound HTTPS to the package index
# (a NAT gateway), or a mirror given by PIP_INDEX_URL in the environment.
set -euo pipefail

requirements_uri="${1:?usage: install_python_deps.sh REQUIREMENTS_S3_URI VENV_DIR}"
venv="${2:?usage: install_python_deps.sh REQUIREMENTS_S3_URI VENV_DIR}"
log() { echo "[fruits-bootstrap] $(date -u +%H:%M:%S) $*"; }

if ! python3.11 -m venv --help >/dev/null 2>&1; then
    log "installing python3.11"
    sudo dnf install -y -q python3.11 python3.11-pip
fi
log "creating $venv with $(python3.11 --version)"
sudo python3.11 -m venv "$venv"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
aws s3 cp --only-show-errors "$requirements_uri" "$tmp/requirements.txt"
log "installing $(grep -c '==' "$tmp/requirements.txt") pinned packages"
sudo "$venv/bin/python" -m pip install --quiet --no-cache-dir --disable-pip-version-check \
    --only-binary=:all: -r "$tmp/requirements.txt"

# Fail the bootstrap here, not later in a Spark task, if an import is broken on this node.
"$venv/bin/python" - <<'PY'
import h5py, keras, matplotlib, numpy, onnxruntime, pandas, PIL, pyarrow, tensorflow
print("[fruits-bootstrap] ok:", "tensorflow", tensorflow.__version__, "numpy", numpy.__version__,
      "pandas", pandas.__version__, "pyarrow", pyarrow.__version__)
PY
