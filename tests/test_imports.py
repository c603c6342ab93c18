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
