"""Bad input: an unreadable or missing slide raises pathray's SlideError naming the URI."""

from __future__ import annotations

import pytest
from blocks import CLASSES, ColourSegmenter

from pathray.inference.analyze import analyze_slide
from pathray.inference.predictor import Predictor
from pathray.inference.spec import ModelSpec
from pathray.models.tasks import build_task
from pathray.wsi.backends.errors import SlideError


@pytest.fixture(scope="module")
def predictor():
    spec = ModelSpec(build_task({"name": "segmentation", "classes": CLASSES}), 64, 2.0)
    return Predictor(ColourSegmenter(), spec)


@pytest.mark.parametrize("name", ["broken/broken.svs", "broken/unreadable.svs", "broken/notanimage.txt"])
def test_unreadable_slides_raise_slide_error_naming_the_uri(testdata, predictor, name):
    uri = str(testdata / name)
    with pytest.raises(SlideError) as err:
        analyze_slide(uri, predictor)
    assert uri in str(err.value)


def test_a_missing_slide_raises_slide_error(tmp_path, predictor):
    uri = str(tmp_path / "nothing.svs")
    with pytest.raises(SlideError, match="nothing.svs"):
        analyze_slide(uri, predictor)
