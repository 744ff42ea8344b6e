"""What a benchmark ran on and the helpers its timings share (qdet/benchmark/machine.py),
against the operating system's and torch's own answers and values worked out here."""

import os

import torch

from qdet.benchmark.machine import (
    available_bytes,
    fmt,
    machine,
    machine_note,
    median_or_none,
    print_targets,
    ratio,
)


def test_machine_is_this_process_and_its_note_says_so():
    info = machine("cpu")
    assert info["device"] == "cpu" and "gpu" not in info
    assert info["cpu_count"] == os.cpu_count()
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["cpu"]
    note = machine_note(info)
    assert note.startswith(f"Machine: CPU {info['cpu']} ({os.cpu_count()} cores), ")
    assert f"torch.get_num_threads() = {torch.get_num_threads()}" in note
    assert machine_note({**info, "gpu": "H100"}).startswith("Machine: GPU H100, CPU ")


def test_available_memory_is_within_the_physical_memory():
    free = available_bytes("cpu")
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert free is not None and 0 < free <= physical


def test_median_ratio_and_format_of_missing_values():
    assert median_or_none([5.0, 1.0, 3.0, 100.0]) == 4.0
    assert median_or_none([]) is None
    assert ratio(3.0, 4.0) == 0.75
    assert ratio(None, 4.0) is None and ratio(3.0, None) is None and ratio(3.0, 0.0) is None
    assert (fmt(2 / 3), fmt(2 / 3, ".3f"), fmt(None)) == ("0.67", "0.667", "n/a")


def test_targets_print_their_verdicts(capsys):
    print_targets(
        [
            {"ok": True, "target": "eager <= 2x plain", "value": 1.5},
            {"ok": False, "target": "memory <= 1x", "value": 1.25},
            {"ok": None, "target": "compiled", "value": None},
        ]
    )
    assert capsys.readouterr().out.splitlines() == [
        "  PASS  eager <= 2x plain (is 1.50)",
        "  FAIL  memory <= 1x (is 1.25)",
        "  n/a   compiled (is n/a)",
    ]
