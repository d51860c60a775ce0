"""α schedules: parsing, lookup and one-line errors."""
import pytest

from sparseinfer.reference import AlphaSchedule, SparseInferError


def test_paper_schedule():
    s = AlphaSchedule.parse("1.03@0-19,1.00")
    assert [s.milli(i) for i in (0, 19, 20, 39)] == [1030, 1030, 1000, 1000]
    assert s.per_layer_milli(40) == [1030] * 20 + [1000] * 20


def test_multiple_ranges_and_default():
    s = AlphaSchedule.parse("1.02@0-9+30, 1.01@10-12, 0.995")
    assert [s.milli(i) for i in (0, 9, 10, 12, 13, 30, 31)] == [1020, 1020, 1010, 1010, 995, 1020, 995]


def test_default_is_one_without_a_bare_entry():
    assert AlphaSchedule.parse("1.03@0-19").milli(25) == 1000


def test_round_trip_through_str():
    for spec in ("1.03@0-19,1.00", "1.02@0-9+30,1.01@10-12,0.995", "1.05"):
        s = AlphaSchedule.parse(spec)
        assert AlphaSchedule.parse(str(s)) == s


@pytest.mark.parametrize("spec,message", [
    ("", "empty"),
    ("abc", "not a number"),
    ("1.0305", "more than 3 decimals"),
    ("-1", "> 0"),
    ("1.02@5-3", "bad layer range"),
    ("1.02@x", "bad layer range"),
    ("1.02@0-9,1.03@5-12", "overlap"),
    ("1.0,1.01", "more than one default"),
])
def test_errors_name_the_problem(spec, message):
    with pytest.raises(SparseInferError, match=message):
        AlphaSchedule.parse(spec)


def test_range_past_the_model_is_an_error():
    with pytest.raises(SparseInferError, match="names layer 39, but the model has 32 layers"):
        AlphaSchedule.parse("1.03@0-39").per_layer_milli(32)
