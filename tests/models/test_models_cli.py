"""`pathray models list` and `pathray models check`, as a new user runs them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pathray.cli import app
from pathray.models.foundation import build_backbone
from pathray.models.presets import preset_names


def test_models_list_shows_every_preset_with_its_facts():
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for name in preset_names():
        assert any(line.split("│")[1].strip() == name for line in lines if line.count("│") > 2), name
    uni = next(line for line in lines if "│ uni " in line)
    cells = [c.strip() for c in uni.split("│")[1:-1]]
    assert cells[:6] == ["uni", "303.4M", "1024", "cls", "224", "0.5"] and "CC-BY-NC-ND" in cells[6]
    midnight = next(line for line in lines if "│ midnight " in line)
    assert "1,134.8M" in midnight and "3072" in midnight and "cls+mean" in midnight


@pytest.fixture(scope="module")
def kaiko_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    state = build_backbone("kaiko_vits16").state_dict()
    torch.save(state, folder / "kaiko.pth")
    del state["blocks.3.norm1.weight"]
    torch.save(state, folder / "broken.pth")
    return folder / "kaiko.pth", folder / "broken.pth"


def test_models_check_loads_strictly(kaiko_checkpoints: tuple[Path, Path]):
    good, broken = kaiko_checkpoints
    ok = CliRunner().invoke(app, ["models", "check", "kaiko_vits16", "--weights", str(good)])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("kaiko_vits16: ok, 21,665,664 parameters, dim 384 (cls)"), ok.stdout

    bad = CliRunner().invoke(app, ["models", "check", "kaiko_vits16", "--weights", str(broken)])
    assert bad.exit_code == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: ") and "missing 1 ['blocks.3.norm1.weight']" in bad.stderr

    other = CliRunner().invoke(app, ["models", "check", "kaiko_vits8", "--weights", str(good)])
    assert (
        other.exit_code == 2
        and "shape mismatch 1 ['patch_embed.proj.weight: checkpoint (384, 3, 16, 16)" in other.stderr
    )
    unknown = CliRunner().invoke(app, ["models", "check", "uni3", "--weights", str(good)])
    assert unknown.exit_code == 2 and "unknown foundation preset 'uni3'" in unknown.stderr
    nowhere = CliRunner().invoke(app, ["models", "check", "uni", "--weights", str(good.parent / "no.bin")])
    assert nowhere.exit_code == 2 and "weights not found" in nowhere.stderr
