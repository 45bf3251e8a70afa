"""The candidates folder contract: records round-trip, a killed writer's last line is ignored."""

import pytest

from sipo_plugin.pairs.candidates import (CANDIDATES_FILE, Candidate, CandidatesError,
                                          append_candidate, candidate_id, read_candidates)


def _record(p, c):
    return Candidate(id=candidate_id(p, c), prompt=f"prompt {p}", prompt_index=p,
                     candidate_index=c, seed=100 * p + c, path=f"images/{candidate_id(p, c)}.png",
                     settings={"steps": 20}, model={"family": "sd15"})


def test_records_round_trip_in_order(tmp_path):
    records = [_record(p, c) for p in range(2) for c in range(3)]
    for r in records:
        append_candidate(tmp_path, r)
    assert read_candidates(tmp_path) == records
    assert records[4].id == "p00001-c01"


def test_unterminated_last_line_is_not_a_record(tmp_path):
    append_candidate(tmp_path, _record(0, 0))
    with open(tmp_path / CANDIDATES_FILE, "a") as f:
        f.write(_record(0, 1).to_json()[:25])  # a writer killed mid-line
    assert [r.id for r in read_candidates(tmp_path)] == ["p00000-c00"]


def test_malformed_and_duplicate_lines_name_file_and_line(tmp_path):
    append_candidate(tmp_path, _record(0, 0))
    append_candidate(tmp_path, _record(0, 0))
    with pytest.raises(CandidatesError, match=r"candidates.jsonl:2: duplicate"):
        read_candidates(tmp_path)
    (tmp_path / CANDIDATES_FILE).write_text('{"id": 3}\n')
    with pytest.raises(CandidatesError, match=r"candidates.jsonl:1: not a candidate record"):
        read_candidates(tmp_path)


def test_missing_file_says_what_to_run(tmp_path):
    with pytest.raises(CandidatesError, match="sipo-pairs sample"):
        read_candidates(tmp_path)


def test_appending_after_a_killed_line_starts_a_fresh_line(tmp_path):
    append_candidate(tmp_path, _record(0, 0))
    with open(tmp_path / CANDIDATES_FILE, "a") as f:
        f.write(_record(0, 1).to_json()[:25])  # a writer killed mid-line
    append_candidate(tmp_path, _record(0, 1))
    assert [r.id for r in read_candidates(tmp_path)] == ["p00000-c00", "p00000-c01"]
