"""envs.fingerprint: what a record's fingerprint holds, and a stable id that changes with it."""

from __future__ import annotations

import torch

from envs.fingerprint import _cpu_model, fingerprint, fingerprint_id


def test_fingerprint_names_packages_device_cpu_and_dtype():
    fp = fingerprint("cpu", torch.float32)
    assert fp["packages"]["torch"].startswith(torch.__version__.split("+")[0])
    assert fp["packages"]["transformers"] and fp["packages"]["numpy"]
    assert fp["device"] == {"type": "cpu", "name": None}
    assert fp["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability() and fp["cpu"]["arch"]
    assert fp["dtype"] == "float32"


def test_fingerprint_id_is_stable_and_changes_with_any_field():
    fp = fingerprint("cpu", "float32")
    assert fingerprint_id(fp) == fingerprint_id(fingerprint("cpu", torch.float32))
    assert len(fingerprint_id(fp)) == 12 and int(fingerprint_id(fp), 16) >= 0
    other = {**fp, "cpu": {**fp["cpu"], "capability": "NO AVX"}}
    assert fingerprint_id(other) != fingerprint_id(fp)
    assert fingerprint_id(fingerprint("cpu", "bfloat16")) != fingerprint_id(fp)


def test_cpu_model_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n")
    assert _cpu_model(info) == "Intel(R) Xeon(R) CPU @ 2.20GHz"
    assert _cpu_model(tmp_path / "absent") is None


def test_process_fingerprint_id_is_the_id_of_this_process_fingerprint():
    import torch

    from envs.fingerprint import fingerprint, fingerprint_id, process_fingerprint_id

    assert process_fingerprint_id("cpu", torch.float32) == fingerprint_id(fingerprint("cpu", torch.float32))
    assert process_fingerprint_id("cpu", torch.float32) != process_fingerprint_id("cpu", torch.bfloat16)
