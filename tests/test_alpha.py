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


@pytest.mark.parametrize("spec", ["1e16", "9223372036854775.807", "1000000.001", "1e999999999", "-1e999999999",
                                  "1.03@0-3,1e7"])
def test_alpha_beyond_the_range_is_refused(spec):
    with pytest.raises(SparseInferError, match="outside the supported range of alpha, 0.001 to 1,000,000"):
        AlphaSchedule.parse(spec)


def test_alpha_held_exactly_at_any_precision():
    from sparseinfer.reference.alpha import MAX_ALPHA_MILLI

    assert AlphaSchedule.parse("1000000").default_milli == MAX_ALPHA_MILLI
    assert AlphaSchedule.parse("0.001").default_milli == 1
    assert AlphaSchedule.parse("1." + "0" * 40).default_milli == 1000      # trailing zeros are exact
    assert AlphaSchedule.parse("12.5e-1").default_milli == 1250
    for spec in ("1.0000000000000000000000000001", "1e-999999999", "0.0005"):   # past Decimal's 28 digits too
        with pytest.raises(SparseInferError, match="more than 3 decimals"):
            AlphaSchedule.parse(spec)


def test_eq2_at_the_largest_alpha_does_not_overflow():
    """At α = 1,000,000 and the longest row, eq. 2 on int64 counts gives what exact integers
    give (an overflow would flip the comparison), with both outcomes present."""
    import numpy as np

    from sparseinfer.reference.alpha import MAX_ALPHA_MILLI
    from sparseinfer.reference.signs import zero_rows_from_counts

    d = 2**31 - 1
    n_neg = [0, 1, d // 2, d - 2147, d - 2148, d - 1, d]       # α at its top: the edge near N_pos 2147
    for milli in (1, 1000, MAX_ALPHA_MILLI):
        exact = [1000 * n > milli * (d - n) for n in n_neg]
        assert zero_rows_from_counts(np.array(n_neg), d, milli).tolist() == exact
        assert any(exact) and not all(exact)


def test_alpha_to_milli_is_exact_in_range_and_never_rounds():
    from sparseinfer.reference.signs import alpha_to_milli

    assert [alpha_to_milli(a) for a in (1.03, 0.001, 1.0, 0.999, 1e6)] == [1030, 1, 1000, 999, 10**9]
    for bad, message in ((1.0305, "more than 3 decimals"), (0.0004, "outside the supported range"),
                         (1e6 + 1, "outside the supported range"), (9223372036854775.807, "outside"),
                         (float("nan"), "finite number > 0"), (-1.0, "finite number > 0")):
        with pytest.raises(SparseInferError, match=message):
            alpha_to_milli(bad)
