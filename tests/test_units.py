"""units.py: a unit of Tl is a whole case or a box, and its text in run files is read and written here only."""
import pytest

import units


@pytest.mark.parametrize("text", ["liver_6", "liver_6@18,8,10", "case@with@at@1,2,3", "a@1,2"])
def test_text_round_trips(text):
    assert str(units.parse(text)) == text


def test_a_unit_says_what_it_is():
    box, volume = units.parse("liver_6@18,8,10"), units.parse("liver_6")
    assert (box.case, box.start, box.whole) == ("liver_6", (18, 8, 10), False)
    assert (volume.case, volume.whole) == ("liver_6", True)
    assert units.parse("a@1,2") == units.Volume("a@1,2")               # not three numbers: a case id
    assert units.box("x", [1.0, 2, 3]) == units.Box("x", (1, 2, 3)) and hash(box) == hash(units.parse(str(box)))
