"""An experiment grid names a foundation preset like an engine, or sets one per engine (cell configs)."""

from __future__ import annotations

from pathlib import Path

from pathray.training.experiment import ExperimentSection, cell_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_a_preset_is_just_another_engine_entry_of_the_grid():
    exp = ExperimentSection(
        base=str(CONFIGS / "gleason-foundation.yaml"),
        engines=["foundation", "kaiko_vits16", "cnn"],
        engine_set={"foundation": ["engine.preset=lunit_vits16", "data.stream.sampler.size=112"]},
    )
    foundation, kaiko, cnn = (cell_config(exp, Path("/tmp"), e, 0.5, 1) for e in exp.engines)
    assert (kaiko.engine.name, kaiko.engine.preset, kaiko.engine.model) == (
        "foundation",
        "kaiko_vits16",
        None,
    )
    assert kaiko.data.stream.sampler.size == 224 and kaiko.data.stream.sampler.mpps == [0.5]
    assert kaiko.run.name == "experiment-kaiko_vits16-f050-w1"
    assert foundation.engine.preset == "lunit_vits16" and foundation.engine.img_size == 112
    assert cnn.engine.preset is None and cnn.data.stream.sampler.size == 256  # the cnn engine's defaults
