"""The package users install: its metadata, optional extras, and a fresh `pip install .` that trains."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = "/usr/share/datasets/fashion-mnist"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_library_accepts_a_wide_torch_range_and_leaves_tensorboard_to_an_extra():
    project = _pyproject()["project"]
    deps = {d.split(">")[0].split("=")[0].split("<")[0].strip(): d for d in project["dependencies"]}
    assert "==" not in deps["torch"] and "<3" in deps["torch"], deps["torch"]
    assert "tensorboard" not in deps
    extras = project["optional-dependencies"]
    assert {"s3", "ray", "serve", "tensorboard"} <= set(extras)
    assert any(d.startswith("tensorboard") for d in extras["tensorboard"])
    assert project["license"] == "Apache-2.0" and "Apache License" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "downpour" / "py.typed").exists()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["downpour"]


def test_without_tensorboard_the_scalar_log_is_off_and_says_so(monkeypatch, caplog, tmp_path):
    from downpour.monitor import tensorboard

    monkeypatch.setattr(tensorboard, "tensorboard_installed", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert tensorboard.open_scalar_log(str(tmp_path / "tb")) is None
    assert "TensorBoard logging is OFF" in caplog.text and "downpour[tensorboard]" in caplog.text
    assert not (tmp_path / "tb").exists()


def test_the_sparse_kernel_status_says_which_path_runs():
    from downpour.sparse.index import KERNEL, NATIVE

    assert (KERNEL == "compiled") == (NATIVE is not None)
    if NATIVE is None:
        assert KERNEL.startswith("numpy (")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(DATA, "train-images-idx3-ubyte.gz")), reason="no Fashion-MNIST")
def test_a_fresh_venv_with_pip_install_dot_trains_the_reference_job(tmp_path):
    """No Makefile: a new virtual environment, `pip install .` (CI's pins as constraints, so the local
    torch wheel is used), then `downpour train examples/mnist.yaml` (cut to 60 steps per worker)."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", "requirements.txt", "."], cwd=src,
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import downpour, os; print(os.path.dirname(downpour.__file__))"],
                          cwd=tmp_path, capture_output=True, text=True, check=True, env=env).stdout.strip()
    assert site.startswith(str(venv)) and os.path.exists(os.path.join(site, "py.typed")), site
    dense = subprocess.run([str(venv / "bin" / "python"), "-c", "from downpour.server.kernels import KERNEL; print(KERNEL)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True, env=env).stdout.strip()
    assert dense == "compiled" or "lacks AVX2" in dense, dense  # built with no more than the sparse kernel needs
    run_dir = tmp_path / "run"
    work = tmp_path / "work"  # not the source folder: the processes must import the installed package
    shutil.copytree(src / "examples", work / "examples")
    train = subprocess.run([str(venv / "bin" / "downpour"), "train", "examples/mnist.yaml", "--set", "training.steps=60",
                            "--run-dir", str(run_dir)], cwd=work, capture_output=True, text=True, timeout=600, env=env)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["test_accuracy"] > 0.5
    assert summary["sparse_kernel"] == "compiled"
    assert (run_dir / "model.pt").exists()
    # tensorboard is an extra: not installed here, so the coordinator says it is off (and nothing breaks).
    assert "TensorBoard logging is OFF" in (run_dir / "logs" / "coordinator.log").read_text()
