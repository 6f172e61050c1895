"""Result files (sparse_lm.results), their Markdown rendering, and the machine description."""

import datetime
import json
import os
import socket

import numpy as np
import pytest

from sparse_lm import results
from sparse_lm.results import format_value, load_result, render, write_result
from sparse_lm.utils.machine import describe_machine, machine_info

MACHINE = {
    "cpu_model": "Test CPU 9000",
    "cores_logical": 8,
    "cores_usable": 4,
    "cpu_quota_cores": None,
    "memory_gib": 31.2,
    "memory_limit_gib": None,
    "os": "Debian GNU/Linux 12 (bookworm)",
    "python": "3.11.7",
    "jax": "0.10.2",
    "jax_backend": "cpu",
}
MACHINE_LINE = (
    "Test CPU 9000, 4/8 cores, 31.2 GiB, Debian GNU/Linux 12 (bookworm), Python 3.11.7, jax 0.10.2 (cpu)"
)


def write(tmp_path, name, metrics, **kwargs):
    kwargs = {"command": f"python experiments/{name}.py", "title": f"Title of {name}", **kwargs}
    return write_result(name, metrics, results_dir=tmp_path / "results", machine=MACHINE, **kwargs)


def test_write_result_contents(tmp_path):
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    path = write(
        tmp_path,
        "decode_benchmark",
        {"tokens_per_s": np.float32(12.5), "layers": np.int64(30), "model": "smollm2", "alpha": 1.0},
        notes="batch 1",
        tables=[
            {"title": "Per layer", "columns": ["layer", "ms"], "rows": [[0, 1.5], (1, np.float64(2.25))]}
        ],
    )
    assert path == tmp_path / "results" / "decode_benchmark.json"
    record = json.loads(path.read_text())
    assert record["name"] == "decode_benchmark"
    assert record["title"] == "Title of decode_benchmark"
    assert record["command"] == "python experiments/decode_benchmark.py"
    assert record["notes"] == "batch 1"
    assert record["machine"] == MACHINE
    # Values converted to plain JSON, in the order given.
    assert list(record["metrics"].items()) == [
        ("tokens_per_s", 12.5),
        ("layers", 30),
        ("model", "smollm2"),
        ("alpha", 1.0),
    ]
    assert record["tables"] == [
        {"title": "Per layer", "columns": ["layer", "ms"], "rows": [[0, 1.5], [1, 2.25]]}
    ]
    date = datetime.datetime.fromisoformat(record["date"])
    assert date.utcoffset() == datetime.timedelta(0)
    assert before <= date <= datetime.datetime.now(datetime.UTC)
    assert not list((tmp_path / "results").glob(".*.tmp"))  # atomic write left no temporary behind


def test_write_result_uses_machine_info_by_default(tmp_path):
    path = write_result("m", {"x": 1}, command="c", title="t", results_dir=tmp_path)
    machine = json.loads(path.read_text())["machine"]
    assert machine["cores_logical"] == os.cpu_count()
    assert machine["jax_backend"] == "cpu"


@pytest.mark.parametrize("name", ["", "a b", "../escape", "a.b", "x/y", "ünï"])
def test_unsafe_name_is_rejected(tmp_path, name):
    with pytest.raises(ValueError, match="result name"):
        write(tmp_path, name, {"x": 1})
    assert not (tmp_path / "results").exists()


def test_bad_content_is_rejected_naming_the_place(tmp_path):
    with pytest.raises(ValueError, match="metric 'hist'"):
        write(tmp_path, "r", {"hist": [1, 2]})
    with pytest.raises(ValueError, match="metric 'nested'"):
        write(tmp_path, "r", {"nested": {"a": 1}})
    with pytest.raises(ValueError, match=r"tables\[0\].rows\[1\]"):
        write(tmp_path, "r", {"x": 1}, tables=[{"title": "t", "columns": ["a", "b"], "rows": [[1, 2], [3]]}])
    with pytest.raises(ValueError, match=r"tables\[0\] must have exactly"):
        write(tmp_path, "r", {"x": 1}, tables=[{"title": "t", "cols": ["a"], "rows": []}])
    with pytest.raises(ValueError, match="command"):
        write(tmp_path, "r", {"x": 1}, command="")


@pytest.mark.parametrize(
    "value, text",
    [
        (12.3456, "12.35"),
        (0.5, "0.5"),
        (1234.5678, "1235"),
        (9999.7, "10000"),
        (123456.7, "123500"),
        (0.000123456, "0.0001235"),
        (1.5e-7, "1.500e-07"),
        (2.5e20, "2.500e+20"),
        (-3.14159, "-3.142"),
        (0.0, "0"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (134515008, "134515008"),
        (True, "true"),
        (None, "–"),
        ("a|b", "a\\|b"),
    ],
)
def test_format_value(value, text):
    assert format_value(value) == text


def test_render_document(tmp_path):
    # Written out of order: sections come sorted by name.
    write(tmp_path, "zeta", {"perplexity": 17.123456}, title="Perplexity")
    write(
        tmp_path,
        "decode_benchmark",
        {"tokens_per_s": 41.26, "model": "SmolLM2-135M"},
        title="Decode throughput",
        command="python experiments/bench_decode.py model=smollm2 'tracker.tags=[a,b]'",
        notes="Greedy decoding, batch 1.",
        tables=[
            {"title": "Per phase", "columns": ["phase", "ms"], "rows": [["ffn", 3.25], ["attention", 1.0]]}
        ],
    )
    figures = tmp_path / "docs" / "figures"
    figures.mkdir(parents=True)
    for stem in ("decode_benchmark", "decode_benchmark_breakdown", "unrelated"):
        (figures / f"{stem}.png").write_bytes(b"png")

    out = render(tmp_path / "results", tmp_path / "docs" / "RESULTS.md")
    text = out.read_text()
    assert text.startswith("# Results\n")
    assert "Generated by `python -m sparse_lm.results render`" in text
    assert "do not edit by hand" in text
    assert text.index("## Decode throughput") < text.index("## Perplexity")
    assert "| [Decode throughput](#decode_benchmark) |" in text
    assert '<a id="decode_benchmark"></a>' in text

    section = text[text.index("## Decode throughput") : text.index('<a id="zeta">')]
    assert "```bash\npython experiments/bench_decode.py model=smollm2 'tracker.tags=[a,b]'\n```" in section
    assert f"Machine: {MACHINE_LINE}" in section
    assert (
        "| Metric | Value |\n| --- | ---: |\n| `tokens_per_s` | 41.26 |\n| `model` | SmolLM2-135M |"
        in section
    )
    assert "**Per phase**\n\n| phase | ms |\n| --- | ---: |\n| ffn | 3.25 |\n| attention | 1 |" in section
    assert "Greedy decoding, batch 1." in section
    assert "![Decode throughput](figures/decode_benchmark.png)" in section
    assert "![Decode throughput](figures/decode_benchmark_breakdown.png)" in section
    assert "unrelated.png" not in text
    assert "| `perplexity` | 17.12 |" in text


def test_figures_go_to_the_longest_matching_name(tmp_path):
    write(tmp_path, "decode", {"x": 1}, title="Short")
    write(tmp_path, "decode_benchmark", {"x": 2}, title="Long")
    figures = tmp_path / "figures"
    figures.mkdir()
    for stem in ("decode", "decode_benchmark", "decode-extra", "decode_benchmark_cpu"):
        (figures / f"{stem}.png").write_bytes(b"png")
    text = render(tmp_path / "results", tmp_path / "RESULTS.md").read_text()
    short = text[text.index("## Short") : text.index('<a id="decode_benchmark">')]
    long = text[text.index("## Long") :]
    assert "(figures/decode.png)" in short and "(figures/decode-extra.png)" in short
    assert "decode_benchmark" not in short
    assert "(figures/decode_benchmark.png)" in long and "(figures/decode_benchmark_cpu.png)" in long


def test_render_without_results(tmp_path):
    (tmp_path / "results").mkdir()
    text = render(tmp_path / "results", tmp_path / "RESULTS.md").read_text()
    assert "No results yet." in text
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        render(tmp_path / "missing_dir", tmp_path / "RESULTS.md")


def test_malformed_files_are_named(tmp_path):
    results_dir = tmp_path / "results"
    write(tmp_path, "good", {"x": 1})
    (results_dir / "broken.json").write_text('{"name": "broken", ')
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        render(results_dir, tmp_path / "RESULTS.md")
    (results_dir / "broken.json").write_text('{"name": "broken", "title": "t"}')
    with pytest.raises(
        ValueError, match=r"broken\.json: missing keys \['date', 'command', 'metrics', 'machine'\]"
    ):
        render(results_dir, tmp_path / "RESULTS.md")
    (results_dir / "broken.json").unlink()
    renamed = json.loads((results_dir / "good.json").read_text())
    (results_dir / "other.json").write_text(json.dumps(renamed))
    with pytest.raises(ValueError, match=r"other\.json: name 'good'"):
        load_result(results_dir / "other.json")
    assert not (tmp_path / "RESULTS.md").exists()


def test_cli_render(tmp_path, capsys):
    write(tmp_path, "r1", {"x": 0.25})
    out = tmp_path / "docs" / "RESULTS.md"
    assert results.main(["render", "--results-dir", str(tmp_path / "results"), "--out", str(out)]) == 0
    assert "| `x` | 0.25 |" in out.read_text()
    assert capsys.readouterr().out.strip() == f"wrote {out} (1 results)"


def test_current_command_is_shell_quoted(monkeypatch):
    monkeypatch.setattr("sys.orig_argv", ["/usr/bin/python3.11", "exp.py", "a=1", "tags=[x, y]"])
    assert results.current_command() == "python exp.py a=1 'tags=[x, y]'"


def test_machine_info_facts():
    info = machine_info()
    assert info["cores_logical"] == os.cpu_count()
    assert 1 <= info["cores_usable"] <= info["cores_logical"]
    assert info["memory_gib"] > 0
    assert info["python"].count(".") == 2
    assert info["jax"] and info["jaxlib"] and info["flax"] and info["numpy"] == np.__version__
    assert info["jax_backend"] == "cpu"
    json.dumps(info)  # JSON-ready as is
    hostname = socket.gethostname()
    if len(hostname) >= 6:
        assert hostname not in json.dumps(info)


def test_describe_machine():
    assert describe_machine(MACHINE) == MACHINE_LINE
    limited = {**MACHINE, "cores_usable": 8, "cpu_quota_cores": 2.0, "memory_limit_gib": 4.0}
    assert describe_machine(limited).startswith(
        "Test CPU 9000, 8 cores (quota 2), 31.2 GiB (limit 4.0 GiB), "
    )


def test_series_are_kept_for_figures_but_not_rendered(tmp_path):
    series = {"train": {"columns": ["step", "loss"], "rows": [[1, 5.25], [2, np.float32(4.5)]]}}
    path = write(tmp_path, "curves", {"ppl": 3.0}, series=series)
    loaded = load_result(path)
    assert loaded["series"] == {"train": {"columns": ["step", "loss"], "rows": [[1, 5.25], [2, 4.5]]}}
    document = render(tmp_path / "results", tmp_path / "RESULTS.md", figures_dir=tmp_path / "figures").read_text()
    assert "`ppl`" in document  # the metrics are rendered, the series are not
    assert "5.25" not in document
    with pytest.raises(ValueError, match="train"):
        write(tmp_path, "bad", {}, series={"train": {"columns": ["a"], "rows": [[1, 2]]}})
