"""The EMR bootstrap installs exactly the lock, and runs the Spark the tests run.

Real: uv.lock, `make emr-requirements` (uv export), the committed bootstrap/requirements-emr.txt, and
bootstrap/install_python_deps.sh itself, run by bash with stand-ins for the node's commands (sudo, aws,
python3.11 and the venv's python record what they are asked and do nothing else), so the script's own logic
(argument handling, pip first, the index URL, hash-checking mode) is what is tested, without installing
TensorFlow. The script on a real node is not run here.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from conftest import REPO
from emr_harness import requirement_entries
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.fast  # no Spark, no DAG run (`make test-fast`)

REQUIREMENTS = REPO / "bootstrap" / "requirements-emr.txt"
SCRIPT = REPO / "bootstrap" / "install_python_deps.sh"
# An EMR 7.x node: Amazon Linux 2023, x86_64, the Python 3.11 the bootstrap builds the venv with.
NODE = {
    "python_version": "3.11",
    "python_full_version": "3.11.14",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for entry in requirement_entries(text):
        req = Requirement(entry.split(" --hash")[0])
        if req.marker is None or req.marker.evaluate(NODE):
            (spec,) = req.specifier
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def _lock_closure() -> dict[str, str]:
    """Every package the lock installs for the "emr" group on a node, walked from uv.lock itself."""
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    packages = {canonicalize_name(p["name"]): p for p in lock["package"]}
    project = next(p for p in lock["package"] if p.get("source", {}).get("virtual") == ".")
    todo = [d for d in project["dev-dependencies"]["emr"]]
    seen: dict[str, str] = {}
    while todo:
        dep = todo.pop()
        if "marker" in dep and not Marker(dep["marker"]).evaluate(NODE):
            continue
        name = canonicalize_name(dep["name"])
        if name in seen:
            continue
        pkg = packages[name]
        seen[name] = pkg["version"]
        todo += pkg.get("dependencies", [])
        for extra in dep.get("extra", []):
            todo += pkg.get("optional-dependencies", {}).get(extra, [])
    return seen


def test_exported_requirements_are_current() -> None:
    """The committed file is what `make emr-requirements` writes from today's uv.lock."""
    out = REPO / "test-artifacts" / "requirements-emr.check.txt"
    out.parent.mkdir(exist_ok=True)
    subprocess.run(
        ["make", "-s", "--no-print-directory", "emr-requirements", f"EMR_REQUIREMENTS={out}"],
        cwd=REPO,
        check=True,
    )
    assert out.read_text() == REQUIREMENTS.read_text(), "run `make emr-requirements` and commit the file"


def test_exported_set_equals_the_lock() -> None:
    """Every transitive package of the emr group, at the locked version, each with hashes."""
    text = REQUIREMENTS.read_text()
    assert _pins(text) == _lock_closure()
    for entry in requirement_entries(text):
        assert re.match(r"^[A-Za-z0-9._-]+==\S+", entry) and "--hash=sha256:" in entry, entry[:80]
    pins = _pins(text)
    for name in ("numpy", "pandas", "pyarrow", "tensorflow-cpu", "keras", "onnxruntime", "obstore", "pip"):
        assert name in pins, name
    assert "pyspark" not in pins  # the cluster's own Spark, not a pip one
    # The same versions as the environment the tests run in.
    from importlib.metadata import version

    for name in ("numpy", "pandas", "pyarrow", "keras", "onnxruntime"):
        assert version(name) == pins[name], name


def test_the_tests_run_the_spark_of_the_emr_release() -> None:
    """Finding 9: pyspark here is the Spark that the requested EMR release ships."""
    import pyspark
    from fruits.config import Settings

    spark_of_release = {"emr-7.12.0": "3.5.6"}
    assert pyspark.__version__ == spark_of_release[Settings().emr_release]


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.mark.parametrize("index_url", ["", "https://mirror.example.internal/simple"])
def test_bootstrap_upgrades_pip_first_then_installs_the_file_with_hashes(
    tmp_path: Path, index_url: str
) -> None:
    bin_dir, calls, venv = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "venv"
    bin_dir.mkdir()
    record = f'echo "$(basename "$0") $*" >> {calls}\n'
    _stub(bin_dir, "sudo", 'exec "$@"\n')
    _stub(bin_dir, "aws", record + f'cp {REQUIREMENTS} "${{@: -1}}"\n')
    # python3.11 -m venv DIR creates DIR/bin/python, itself a recorder that also keeps what pip was given.
    venv_python = (
        record
        + 'for a in "$@"; do [ -f "$a" ] && cp "$a" "'
        + str(tmp_path)
        + '/given-$(basename "$a")"; done\nexit 0\n'
    )
    _stub(
        bin_dir,
        "python3.11",
        record
        + 'if [ "$1 $2" = "-m venv" ] && [ -n "$3" ] && [ "$3" != "--help" ]; then mkdir -p "$3/bin"; '
        + f"cat > \"$3/bin/python\" <<'EOF'\n#!/bin/bash\n{venv_python}EOF\n"
        + 'chmod +x "$3/bin/python"; fi\n'
        + 'if [ "$1" = "--version" ]; then echo "Python 3.11.14"; fi\n',
    )
    args = ["bash", str(SCRIPT), "s3://bucket/artifacts/bootstrap/abc/requirements-emr.txt", str(venv)]
    if index_url:
        args.append(index_url)
    proc = subprocess.run(
        args,
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    lines = calls.read_text().splitlines()
    pip_calls = [line for line in lines if " -m pip install " in line]
    assert len(pip_calls) == 2
    first, second = pip_calls
    assert first.endswith("pip.txt") and second.endswith("requirements.txt")  # pip is upgraded first
    for call in pip_calls:
        assert "--require-hashes" in call and "--only-binary=:all:" in call and "--no-deps" in call
        assert (f"--index-url {index_url}" in call) == bool(index_url)
    pip_entry = (tmp_path / "given-pip.txt").read_text()
    assert pip_entry.startswith(f"pip=={_pins(REQUIREMENTS.read_text())['pip']} ")
    assert "--hash=sha256:" in pip_entry and "numpy" not in pip_entry
    assert (tmp_path / "given-requirements.txt").read_text() == REQUIREMENTS.read_text()
    assert any(" -m pip check" in line for line in lines)


def test_bootstrap_refuses_missing_arguments(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "s3://x/req.txt"], capture_output=True, text=True)
    assert proc.returncode != 0 and "usage: install_python_deps.sh" in proc.stderr


def test_emr_request_passes_the_index_url_as_an_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    from fruits.config import Settings
    from fruits.emr import job_flow_request

    staged = {"bootstrap": "s3://b/boot.sh", "requirements": "s3://b/req.txt"}
    plan = {"run_id": "manual__x", "new_batches": 1}
    monkeypatch.setenv("FRUITS_EMR_SUBNET_ID", "subnet-1")
    (action,) = job_flow_request(plan, staged, Settings())["BootstrapActions"]
    assert action["ScriptBootstrapAction"]["Args"] == ["s3://b/req.txt", "/opt/fruits/venv"]
    monkeypatch.setenv("FRUITS_EMR_PIP_INDEX_URL", "https://mirror.internal/simple")
    (action,) = job_flow_request(plan, staged, Settings())["BootstrapActions"]
    assert action["ScriptBootstrapAction"]["Args"][-1] == "https://mirror.internal/simple"
