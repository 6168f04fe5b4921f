"""Communication accounting against section 3 and Table 1 of the paper; the per-round JSON log."""

from __future__ import annotations

import pytest

from fedrun.comm import (
    CommLog,
    collective_bytes_per_round,
    paper_round_count,
    paper_total,
    read_comm_log,
    usplit_range,
)
from fedrun.methods import RoundPlan, plan_round

SIZES = {"encoder": 1_280_642, "bottleneck": 999_376, "decoder": 716_297}
P, M, U = 2_996_315, 999_376, 716_297
R = 15

# Table 1, N x 10^6
TABLE1 = {
    ("full", 2): 179.78,
    ("full", 5): 449.45,
    ("full", 10): 898.89,
    ("usplit", 2): 134.83,
    ("usplit", 10): 674.17,
    ("ulatdec", 2): 105.50,
    ("ulatdec", 5): 263.75,
    ("ulatdec", 10): 527.51,
    ("udec", 2): 47.54,
    ("udec", 5): 118.85,
    ("udec", 10): 237.69,
}


def test_sizes_add_up_to_the_paper_model():
    assert sum(SIZES.values()) == P


@pytest.mark.parametrize("k", [2, 5, 10])
def test_formulas_of_section_3(k):
    assert paper_total("full", SIZES, k, R, seed=2023) == 2 * P * R * k
    assert paper_total("udec", SIZES, k, R, seed=2023) == k * (P + U + 2 * U * (R - 1))
    assert paper_total("ulatdec", SIZES, k, R, seed=2023) == k * (P + (U + M) + 2 * (U + M) * (R - 1))


@pytest.mark.parametrize(("method", "k"), sorted(TABLE1))
def test_table1_rounded(method, k):
    assert paper_total(method, SIZES, k, R, seed=2023) == pytest.approx(TABLE1[(method, k)] * 1e6, abs=0.01e6)


def test_table1_exact_values():
    assert paper_total("full", SIZES, 2, R, 0) == 179_778_900
    assert paper_total("full", SIZES, 5, R, 0) == 449_447_250
    assert paper_total("full", SIZES, 10, R, 0) == 898_894_500
    # 2 (P + U + 28 U) = 2 (2,996,315 + 29 * 716,297) = 2 * 23,768,928
    assert paper_total("udec", SIZES, 2, R, 0) == 47_537_856
    assert paper_total("udec", SIZES, 10, R, 0) == 237_689_280
    assert paper_total("ulatdec", SIZES, 5, R, 0) == 263_754_160
    # even K: every pair uploads exactly P, no randomness: K P R + (K/2) P R
    assert paper_total("usplit", SIZES, 2, R, 0) == 3 * P * R == 134_834_175
    assert paper_total("usplit", SIZES, 10, R, 0) == 15 * P * R == 674_170_875


def test_usplit_k5_range():
    # K P R + 2 pairs * P * R + R (M + U)  ..  + R (M + E)
    assert usplit_range(SIZES, 5, R) == (340_348_170, 348_813_345)
    lo, hi = usplit_range(SIZES, 5, R)
    totals = {paper_total("usplit", SIZES, 5, R, seed) for seed in range(20)}
    assert all(lo <= t <= hi for t in totals)
    assert len(totals) > 1  # the odd client's role is random
    assert lo <= 343.73e6 <= hi  # the paper's draw
    assert usplit_range(SIZES, 2, R) == (134_834_175, 134_834_175)
    assert usplit_range(SIZES, 1, R) == (2 * P * R, 2 * P * R)


def test_sampled_clients_upload_and_every_client_downloads():
    """m of K sampled: only the m upload (their plans' assignments), all K download."""
    assert paper_total("full", SIZES, 5, R, 0, sample_clients=2) == (5 + 2) * P * R
    assert paper_total("full", SIZES, 5, R, 0, sample_clients=5) == paper_total("full", SIZES, 5, R, 0)
    assert paper_total("udec", SIZES, 5, R, 0, sample_clients=2) == 5 * (P + U * (R - 1)) + 2 * U * R
    # USplit among the sampled: one pair uploads P; a lone client uploads P too
    assert usplit_range(SIZES, 5, R, 2) == ((5 + 1) * P * R,) * 2
    assert usplit_range(SIZES, 5, R, 1) == ((5 + 1) * P * R,) * 2
    for m in (1, 2, 3):
        lo, hi = usplit_range(SIZES, 5, R, m)
        totals = {paper_total("usplit", SIZES, 5, R, seed, sample_clients=m) for seed in range(20)}
        assert all(lo <= t <= hi for t in totals), (m, lo, hi, totals)
    assert usplit_range(SIZES, 5, R, 3) == (5 * P * R + P * R + R * (M + U), 5 * P * R + P * R + R * (M + 1_280_642))


def test_round_count_by_hand_small_sizes():
    sizes = {"encoder": 10, "bottleneck": 5, "decoder": 3}
    udec = plan_round("udec", 1, 2, 0)
    assert paper_round_count(udec, sizes, first_round=True) == 2 * (18 + 3)
    assert paper_round_count(udec, sizes, first_round=False) == 2 * (3 + 3)
    split = RoundPlan(2, (frozenset({"encoder", "bottleneck"}), frozenset({"decoder"})), True, "usplit")
    # both download the whole model every round; uploads 15 + 3
    assert paper_round_count(split, sizes, first_round=False) == 2 * 18 + 15 + 3


def test_collective_bytes_by_hand():
    named = {"encoder": 10, "bottleneck": 5, "decoder": 3}
    assert collective_bytes_per_round(plan_round("udec", 1, 2, 0), named, "fp32") == (3 + 1) * 4
    assert collective_bytes_per_round(plan_round("ulatdec", 1, 2, 0), named, "fp32") == (8 + 2) * 4
    assert collective_bytes_per_round(plan_round("full", 1, 2, 0), named, "fp32") == (18 + 3) * 4
    assert collective_bytes_per_round(plan_round("full", 1, 2, 0), named, "bf16") == (18 + 3) * 2
    assert collective_bytes_per_round(plan_round("usplit", 1, 3, 0), named, "fp32", dtype_bytes=8) == 21 * 8
    assert collective_bytes_per_round(RoundPlan(1, (frozenset(),), False), named, "fp32") == 0
    # sizes may also be given per tensor
    per_tensor = {"encoder": [6, 4], "bottleneck": [5], "decoder": [2, 1]}
    assert collective_bytes_per_round(plan_round("full", 1, 2, 0), per_tensor, "fp32") == (18 + 3) * 4


def test_comm_log_writes_one_line_per_round(tmp_path):
    path = tmp_path / "run" / "comm.jsonl"
    sizes = {"encoder": 10, "bottleneck": 5, "decoder": 3}
    log = CommLog(path)
    r1 = log.append(
        1,
        paper_params=paper_round_count(plan_round("udec", 1, 2, 0), sizes, first_round=True),
        bytes_moved=16,
        sync_seconds=0.5,
    )
    r2 = log.append(2, paper_params=12, bytes_moved=16, sync_seconds=0.25)
    assert r1 == {
        "round": 1,
        "paper_params": 42,
        "paper_params_cum": 42,
        "bytes": 16,
        "bytes_cum": 16,
        "sync_seconds": 0.5,
    }
    assert r2 == {
        "round": 2,
        "paper_params": 12,
        "paper_params_cum": 54,
        "bytes": 16,
        "bytes_cum": 32,
        "sync_seconds": 0.25,
    }
    # what the paper counts for a later round of UDec: 2 clients x (3 down + 3 up)
    udec3 = paper_round_count(plan_round("udec", 3, 2, 0), sizes, first_round=False)
    assert log.append(3, paper_params=udec3, bytes_moved=0)["paper_params"] == 12
    rows = read_comm_log(path)
    assert rows[:2] == [r1, r2] and len(rows) == 3
    assert len(path.read_text().splitlines()) == 3
    assert log.counters() == {"paper_params_cum": 66, "bytes_cum": 32}


def test_comm_log_without_path_writes_nothing(tmp_path):
    log = CommLog()
    sizes = {"encoder": 1, "bottleneck": 1, "decoder": 1}
    log.append(1, paper_params=paper_round_count(plan_round("full", 1, 2, 0), sizes, first_round=True), bytes_moved=8)
    assert log.rows[0]["paper_params"] == 2 * 3 * 2 and log.rows[0]["bytes"] == 8
    assert list(tmp_path.iterdir()) == []


def test_comm_log_resume_truncates_and_continues_totals(tmp_path):
    path = tmp_path / "comm.jsonl"
    log = CommLog(path, truncate_after=0)
    for r in range(1, 4):
        log.append(r, paper_params=36, bytes_moved=4)
    saved_after_round_1 = {"paper_params_cum": 36, "bytes_cum": 4}
    # resumed from the checkpoint of round 1: rounds 2 and 3 are run again
    again = CommLog(path, truncate_after=1, **saved_after_round_1)
    assert [r["round"] for r in read_comm_log(path)] == [1]
    row = again.append(2, paper_params=36, bytes_moved=4)
    assert row["paper_params_cum"] == 72 and row["bytes_cum"] == 8
    assert [r["round"] for r in read_comm_log(path)] == [1, 2]
    # a fresh start (truncate_after=0) empties a stale file
    CommLog(path, truncate_after=0)
    assert read_comm_log(path) == []


def test_missing_group_size_rejected():
    with pytest.raises(ValueError, match="decoder"):
        paper_total("full", {"encoder": 1, "bottleneck": 1}, 2, 1, 0)


def _log_of_three_rounds(path):
    log = CommLog(path, truncate_after=0)
    for r in range(1, 4):
        log.append(r, paper_params=36, bytes_moved=4)
    return path.read_text().splitlines()


def test_resume_repairs_a_partial_last_line(tmp_path):
    path = tmp_path / "comm.jsonl"
    lines = _log_of_three_rounds(path)
    path.write_text("\n".join(lines) + '\n{"round": 4, "paper_par')  # a crash while appending round 4
    warnings = []
    log = CommLog(path, truncate_after=3, paper_params_cum=108, bytes_cum=12, warn=warnings.append)
    assert len(warnings) == 1 and str(path) in warnings[0] and "[4]" in warnings[0]
    assert [r["round"] for r in read_comm_log(path)] == [1, 2, 3]
    assert log.append(4, paper_params=36, bytes_moved=4)["paper_params_cum"] == 144
    assert [r["round"] for r in read_comm_log(path)] == [1, 2, 3, 4]


def test_resume_reports_lost_rows_and_continues_from_the_checkpoint(tmp_path):
    path = tmp_path / "comm.jsonl"
    lines = _log_of_three_rounds(path)
    path.write_text("\n".join([lines[0], "garbage", '{"round": "2"}', lines[2]]) + "\n")
    warnings = []
    log = CommLog(path, truncate_after=3, paper_params_cum=108, bytes_cum=12, warn=warnings.append)
    assert len(warnings) == 2 and "[2, 3]" in warnings[0] and "round(s) [2]" in warnings[1]
    assert [r["round"] for r in read_comm_log(path)] == [1, 3]
    assert log.counters() == {"paper_params_cum": 108, "bytes_cum": 12}
    # totals in the file that disagree with the checkpoint are reported too
    CommLog(path, truncate_after=1, paper_params_cum=99, bytes_cum=4, warn=warnings.append)
    assert "differ from its checkpoint" in warnings[-1]


def test_read_comm_log_names_the_bad_line(tmp_path):
    path = tmp_path / "comm.jsonl"
    path.write_text('{"round": 1}\n')
    with pytest.raises(ValueError, match="line 1 is not a comm.jsonl row"):
        read_comm_log(path)
