"""sparse_lm.roofline.hardware and calibrate: the registry, clear errors, the calibration file round trip."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sparse_lm.roofline import HardwareProfile, HardwareSpec, calibrate, get_profile, known_profiles, load_calibration

CONF = Path(__file__).resolve().parents[2] / "conf" / "hardware"
MACHINE = {"cpu_model": "Test CPU", "cores_logical": 2, "cores_usable": 2, "memory_gib": 8.0, "jax_backend": "cpu"}


def test_registry_numbers_from_anchors():
    high, low = get_profile("pc_high"), get_profile("pc_low")
    assert (high.cpu_bandwidth, low.cpu_bandwidth) == (67.2e9, 38.4e9)
    assert (high.gpu_bandwidth, low.gpu_bandwidth) == (1008e9, 616e9)
    assert (high.gpu_memory_bytes, low.gpu_memory_bytes) == (24 * 2**30, 11 * 2**30)
    assert (high.pcie_bandwidth, low.pcie_bandwidth) == (32e9, 16e9)
    assert (get_profile("a100").gpu_bandwidth, get_profile("h100").gpu_bandwidth) == (2039e9, 3072e9)


def test_unknown_profile_and_key_are_named():
    with pytest.raises(KeyError, match="'pc_hihg'.*known profiles: a100, h100, pc_high, pc_low, this_machine"):
        get_profile("pc_hihg")
    data = get_profile("pc_low").to_dict() | {"gpu_bandwith": 1.0}
    with pytest.raises(ValueError, match="unknown key.*gpu_bandwith"):
        HardwareProfile.from_dict(data)
    with pytest.raises(ValueError, match="or none of them"):
        HardwareProfile("half", cpu_bandwidth=1e9, cpu_flops=1e9, host_memory_bytes=1e9, gpu_bandwidth=1e9)
    with pytest.raises(ValueError, match="hardware.name='pc_mid'"):
        HardwareSpec(name="pc_mid")


def test_missing_calibration_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="calibrate_hardware.py"):
        get_profile("this_machine", tmp_path / "none.json")


def test_calibration_round_trip(tmp_path):
    profile = HardwareProfile("this_machine", cpu_bandwidth=12.5e9, cpu_flops=3.0e11, host_memory_bytes=8 * 2**30,
                              disk_bandwidth=1.5e9, disk_iops=20000.0, bandwidth_efficiency=1.0,
                              compute_efficiency=1.0, source="test")
    summary = {"read_bandwidth_gb_per_s": 12.5, **calibrate.profile_metrics(profile), "command": "pytest"}
    cfg = calibrate.CalibrationConfig(record_as="hardware_this_machine", results_dir=str(tmp_path))
    path = calibrate.write_calibration_result(cfg, summary, machine=MACHINE)
    loaded = load_calibration(path)
    assert loaded == profile
    assert not loaded.has_gpu


def test_calibration_run_measures(tmp_path):
    cfg = calibrate.CalibrationConfig(bandwidth_bytes=8 << 20, repeats=1, matmul_size=128,
                                      disk_dir=str(tmp_path / "disk"), disk_file_bytes=1 << 20,
                                      disk_block_bytes=256 << 10, random_reads=50,
                                      record_as="hardware_this_machine", results_dir=str(tmp_path / "results"))
    summary = calibrate.run(cfg, tmp_path / "run")
    profile = load_calibration(tmp_path / "results" / "hardware_this_machine.json")
    assert profile.cpu_bandwidth == summary["profile_cpu_bandwidth"] > 1e8
    assert profile.cpu_flops > 1e8 and profile.disk_bandwidth > 1e6 and profile.disk_iops > 10
    assert not list((tmp_path / "disk").iterdir())  # the probe file is removed


def test_tmpfs_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "_filesystem_type", lambda path: "tmpfs")
    with pytest.raises(ValueError, match="tmpfs"):
        calibrate.measure_disk(tmp_path, 1 << 20, 1 << 20, 8192, 10)


def test_bad_calibration_config_names_key():
    with pytest.raises(ValueError, match="random_block_bytes must be a positive multiple of 4096"):
        calibrate.CalibrationConfig(random_block_bytes=5000)


def test_hardware_group_files_name_registry_profiles(tmp_path):
    names = sorted(path.stem for path in CONF.glob("*.yaml"))
    assert names == known_profiles()
    for path in CONF.glob("*.yaml"):
        spec = HardwareSpec(**OmegaConf.to_container(OmegaConf.load(path)))
        assert spec.name == path.stem
        if spec.name != "this_machine":
            assert spec.resolve() == get_profile(spec.name)
