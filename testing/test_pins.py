"""The environment files agree and the installed versions are the pinned ones."""

from pathlib import Path

import check_pins


def test_environment_files_and_installed_versions_match():
    assert check_pins.pin_problems() == []


def test_a_mismatch_is_reported(tmp_path: Path):
    (tmp_path / "requirements.txt").write_text("torch==2.5.1\ntransformers==4.55.2\nnumpy==2.1.3\n")
    (tmp_path / "environment.yml").write_text("dependencies:\n  - pytorch=2.5.1\n  - pip:\n"
                                              "      - transformers==4.55.2\n      - numpy==2.0.0\n")
    assert check_pins.pin_problems(tmp_path) == ["numpy: requirements.txt has 2.1.3, environment.yml has 2.0.0"]
