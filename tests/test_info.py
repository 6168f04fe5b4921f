import json
import math
import subprocess
import sys

from fedrun.cli import main

P, E, M, U = 2_996_315, 1_280_642, 999_376, 716_297


def test_info_json_matches_the_papers_counts(capsys):
    assert main(["info", "--preset", "paper-fmnist", "--clients", "5", "--rounds", "15", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"] == {"total": P, "encoder": E, "bottleneck": M, "decoder": U}
    K, R = 5, 15
    assert d["comm"]["full"] == 2 * P * R * K == 449_447_250
    assert d["comm"]["udec"] == K * (P + U + 2 * U * (R - 1))
    assert d["comm"]["ulatdec"] == K * (P + (U + M) + 2 * (U + M) * (R - 1)) == 263_754_160
    assert d["comm"]["usplit"] == [340_348_170, 348_813_345]
    # one flat fp32 buffer: the shared parameters plus one denominator slot per shared group
    assert d["bytes_per_round_per_rank"]["udec"]["fp32"] == 4 * (U + 1)
    assert d["bytes_per_round_per_rank"]["full"]["bf16"] * 2 == d["bytes_per_round_per_rank"]["full"]["fp32"]
    # int8: 256 codes + one fp32 scale per block, each of the 5 ranks' shards padded to whole blocks, 4-byte slots
    shard_blocks = math.ceil(math.ceil(U / 256) / K)
    assert d["bytes_per_round_per_rank"]["udec"]["int8"] == K * (4 + 260 * shard_blocks)


def test_info_text_and_bad_value():
    p = subprocess.run(
        [sys.executable, "-m", "fedrun", "info", "--preset", "paper-fmnist", "--clients", "2"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0 and "179.78 x 10^6" in p.stdout and "2,996,315 parameters" in p.stdout
    p = subprocess.run([sys.executable, "-m", "fedrun", "info", "--method", "fedsgd"], capture_output=True, text=True)
    assert p.returncode == 2 and "federation.method='fedsgd'" in p.stderr and "Traceback" not in p.stderr


def test_info_names_each_traffic_figure(capsys):
    """N (parameters over the run, the paper's count) and the all-reduce bytes per round are two figures: UDec is
    26.4 % of FULL by the first and 23.9 % by the second, and the text says which is which."""
    from fedrun.comm import TRAFFIC_TERMS

    assert main(["info", "--preset", "paper-fmnist", "--clients", "5", "--rounds", "15"]) == 0
    out = capsys.readouterr().out
    assert "communication of K=5 clients over R=15 rounds" in out
    assert all(line in out for line in TRAFFIC_TERMS)
    assert "N over the run" in out and "all-reduce per round and rank" in out
    udec = next(line for line in out.splitlines() if line.strip().startswith("udec"))
    # then per exchange dtype its bytes and their share of FULL fp32's: fp32, bf16, int8
    assert udec.split()[1:5] == ["118.84", "x", "10^6", "26.4"]
    assert udec.split()[6:] == ["2.73", "MiB", "23.9", "%", "1.37", "MiB", "12.0", "%", "0.69", "MiB", "6.1", "%"]
    assert "% of full" not in out  # the old, unnamed ratio
    assert main(["info", "--preset", "paper-fmnist", "--json"]) == 0
    units = json.loads(capsys.readouterr().out)["units"]
    assert "paper's count" in units["comm"] and "in one round" in units["bytes_per_round_per_rank"]


def test_info_counts_the_uploads_of_sampled_clients_only(capsys):
    args = ["info", "--preset", "paper-fmnist", "--clients", "5", "--rounds", "15"]
    assert main([*args, "--json"]) == 0
    every = json.loads(capsys.readouterr().out)
    assert main([*args, "--set", "federation.sample_clients=2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["sample_clients"] == 2 and d["comm"]["full"] == (5 + 2) * P * 15
    assert d["bytes_per_round_per_rank"] == every["bytes_per_round_per_rank"]  # the collective is the same
    assert main([*args, "--set", "federation.sample_clients=2"]) == 0
    text = capsys.readouterr().out
    assert "2 of the 5 clients take part" in text and "clients not drawn send zeros" in text
    assert main(args) == 0 and "take part" not in capsys.readouterr().out
