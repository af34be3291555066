"""`eval --weights DIR`: the registry serves 'mini' from another exported folder (a run's export)."""

import shutil

import pytest

from engine import registry
from engine.records import EngineError


@pytest.fixture
def restore_mini():
    original = registry.MINI_DIR
    yield original
    registry.use_mini_weights(original)


def test_a_folder_without_a_manifest_is_refused_and_nothing_changes(tmp_path, restore_mini):
    with pytest.raises(EngineError, match="not an exported mini model"):
        registry.use_mini_weights(tmp_path)
    assert registry.MINI_DIR == restore_mini


def test_mini_is_loaded_from_the_chosen_folder(tmp_path, restore_mini):
    folder = tmp_path / "export"
    shutil.copytree(restore_mini, folder)
    registry.use_mini_weights(folder)
    assert registry.load("mini", "text", "cpu").prior is not None
    # the copy is what gets read: a damaged file there is caught by its recorded SHA-256
    path = folder / "text_prior.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    registry.use_mini_weights(folder)  # drops the cache
    with pytest.raises(EngineError):
        registry.load("mini", "text", "cpu")


def test_eval_refuses_weights_for_an_official_model(tmp_path, capsys):
    from engine.cli import main

    assert main(["eval", "--model", "text300M", "--weights", str(tmp_path), "--mode", "text"]) != 0
    assert "use it with --model mini" in capsys.readouterr().err
