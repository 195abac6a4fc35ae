"""Answer extraction, lemma scoring and resumable result files (offline, fast)."""

from __future__ import annotations

import pandas as pd
import pytest

import utils


# --- answer extraction --------------------------------------------------------


@pytest.mark.parametrize("generation, expected", [
    (" Paris\nQ: next question", "Paris"),
    ("\n\n  Tokyo  \nKyoto", "Tokyo"),
    ("   \n\t\n", ""),
    ("", ""),
])
def test_extract_answer_first_non_empty_line(generation, expected):
    assert utils.extract_answer(generation) == expected


# --- scoring --------------------------------------------------------------------


def test_alias_inside_prediction_is_correct():
    lemmas, answer_lemmas, correct = utils.score_prediction("The city of Paris.", ["Paris"])
    assert lemmas == ["the", "city", "of", "paris"]
    assert answer_lemmas == [["paris"]]
    assert correct is True


def test_plural_matches_by_lemma():
    lemmas, answer_lemmas, correct = utils.score_prediction("Many cities", ["city"])
    assert lemmas == ["many", "city"] and answer_lemmas == [["city"]]
    assert correct is True


def test_multi_word_alias_must_be_contiguous():
    assert utils.score_prediction("Leonardo da Vinci painted it", ["Leonardo da Vinci"])[2] is True
    # the same words, not contiguous
    assert utils.score_prediction("Leonardo, the painter da Vinci", ["Leonardo da Vinci"])[2] is False
    assert utils.score_prediction("Vinci da Leonardo", ["Leonardo da Vinci"])[2] is False


def test_any_alias_counts():
    _, answer_lemmas, correct = utils.score_prediction("Shakespeare", ["William Shakespeare", "Shakespeare"])
    assert answer_lemmas == [["william", "shakespeare"], ["shakespeare"]]
    assert correct is True


def test_empty_prediction_or_no_aliases_is_incorrect():
    assert utils.score_prediction("", ["Paris"]) == ([], [["paris"]], False)
    assert utils.score_prediction("Paris", [])[2] is False
    assert utils.score_prediction("Paris", [""])[2] is False  # an empty alias matches nothing


def test_wrong_answer_is_incorrect():
    assert utils.score_prediction("Lyon", ["Paris"])[2] is False
    assert utils.score_prediction("Parisian", ["Paris"])[2] is False  # whole words only


def test_contains_sequence():
    assert utils.contains_sequence(["a", "b", "c"], ["b", "c"])
    assert not utils.contains_sequence(["a", "b", "c"], ["a", "c"])
    assert not utils.contains_sequence(["a"], [])
    assert not utils.contains_sequence([], ["a"])


# --- resumable results -------------------------------------------------------------


def test_resumable_results_refuses_existing_output(tmp_path):
    out = tmp_path / "res.feather"
    pd.DataFrame({"uuid": ["a"]}).to_feather(out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        utils.ResumableResults(out)
    results = utils.ResumableResults(out, overwrite=True)
    assert results.rows == [] and results.done == set()


def test_resumable_results_resume_and_finish(tmp_path):
    out = tmp_path / "res.feather"
    first = utils.ResumableResults(out)
    first.add([{"uuid": "u1", "x": 1}, {"uuid": "u2", "x": 2}])
    assert first.partial.is_file() and not out.exists()  # interrupted here: only the partial file exists

    second = utils.ResumableResults(out)  # a new run resumes
    assert second.done == {"u1", "u2"}
    assert [r["x"] for r in second.rows] == [1, 2]
    second.add([{"uuid": "u3", "x": 3}])
    df = second.finish()
    assert df["uuid"].tolist() == ["u1", "u2", "u3"]
    assert out.is_file() and not second.partial.exists()
    assert pd.read_feather(out)["x"].tolist() == [1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["res.feather"]  # no temp files left
    with pytest.raises(FileExistsError):
        utils.ResumableResults(out)


def test_overwrite_drops_the_partial_file(tmp_path):
    out = tmp_path / "res.feather"
    utils.ResumableResults(out).add([{"uuid": "old"}])
    fresh = utils.ResumableResults(out, overwrite=True)
    assert fresh.done == set() and not fresh.partial.exists()


def test_write_feather_atomic_replaces_whole_file(tmp_path):
    out = tmp_path / "sub" / "f.feather"
    utils.write_feather_atomic(pd.DataFrame({"a": [1, 2]}), out)
    utils.write_feather_atomic(pd.DataFrame({"a": [3]}), out)
    assert pd.read_feather(out)["a"].tolist() == [3]
    assert [p.name for p in out.parent.iterdir()] == ["f.feather"]
