"""What a new user tripped on (issue 14): each CLI fix checked through `promptseg.cli.main`."""
from __future__ import annotations

from pathlib import Path

import pytest

from promptseg.cli import main
from promptseg.errors import InputError


class Stop(InputError):
    """Raised by a stand-in for build_tasks, to end a command once its arguments are seen."""


def record_axis(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace build_tasks in the train and eval commands by one that records its axis and stops."""
    seen: list[int] = []

    def fake_build_tasks(*args: object, axis: int = -1, **kwargs: object) -> list:
        seen.append(axis)
        raise Stop("--data", "stopped by the test")

    for module in ("promptseg.cli.train", "promptseg.cli.eval"):
        monkeypatch.setattr(f"{module}.build_tasks", fake_build_tasks)
    return seen


@pytest.mark.parametrize("given, expected", [([], 2), (["--axis", "0"], 0), (["--axis", "1"], 1)])
def test_train_and_eval_slice_along_axis(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, given: list[str],
                                         expected: int, capsys: pytest.CaptureFixture[str]) -> None:
    seen = record_axis(monkeypatch)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress"] + given) == 2
    assert main(["eval", "--data", str(data), "--methods", "nearest_prompt", "--no-progress"] + given) == 2
    assert seen == [expected, expected]
    assert capsys.readouterr().err.count("stopped by the test") == 2


def test_axis_outside_0_to_2_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--out", str(tmp_path / "run"), "--axis", "3"]) == 2
    assert "--axis: invalid choice: 3" in capsys.readouterr().err
