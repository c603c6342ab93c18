"""Import strings of a job (model, data, loss, metrics): ``package.module:function`` and ``file:PATH:function``."""

from __future__ import annotations

import pytest

from downpour.errors import ConfigError
from downpour.imports import import_object


def test_functions_of_two_scripts_by_path_are_each_found_in_their_own(tmp_path):
    (tmp_path / "a.py").write_text("def make_model():\n    return 'model'\n")
    (tmp_path / "b.py").write_text("def loss():\n    return 'loss'\n")
    assert import_object(f"file:{tmp_path / 'a.py'}:make_model", "model.factory")() == "model"
    assert import_object(f"file:{tmp_path / 'b.py'}:loss", "training.loss")() == "loss"
    assert import_object(f"file:{tmp_path / 'a.py'}:make_model", "model.factory")() == "model"  # (imported once)


def test_a_script_that_is_not_there_or_lacks_the_function_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model.factory: no such script .*nope.py"):
        import_object(f"file:{tmp_path / 'nope.py'}:f", "model.factory")
    (tmp_path / "c.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="has no attribute 'f'"):
        import_object(f"file:{tmp_path / 'c.py'}:f", "model.factory")


def test_a_module_path_that_does_not_import_is_a_clear_error():
    with pytest.raises(ConfigError, match="training.loss: cannot import 'no_such_module_xyz'"):
        import_object("no_such_module_xyz:f", "training.loss")
    with pytest.raises(ConfigError, match="expected 'package.module:function'"):
        import_object("justaname", "training.loss")


@pytest.mark.slow
def test_downpour_train_resolves_import_paths_from_the_current_folder(tmp_path, tiny_data):
    import os
    import subprocess
    import sys

    import yaml

    from tests.conftest import tiny_job

    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "losses.py").write_text("from torch.nn.functional import cross_entropy as ce\n")
    job = tiny_job(tiny_data, training={"loss": "mypkg.losses:ce", "metrics": {"m": "mypkg.losses:nope"}})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "downpour"), "train", "job.yaml"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    # mypkg was found (the loss resolved); the metric's function is not there: refused before anything started
    assert done.returncode == 2, done.stderr[-2000:]
    assert "training.metrics.m: 'mypkg.losses:nope' has no attribute 'nope'" in done.stderr, done.stderr[-2000:]
