"""The job report's table says what each column means, and its verbose form each region."""

from __future__ import annotations

from typing import Any

from dynamo_dist.tools import cli
from dynamo_dist.tools.report import (
    COLUMNS,
    LEGEND,
    REGION_COLUMNS,
    REGION_LEGEND,
    format_table,
)


def _report() -> dict[str, Any]:
    regions = {
        "Block (model.py:12) [compile #1 of group world]": {
            "exchanges": 7,
            "hits": 6,
            "misses": 1,
            "wait_ms_total": 350.5,
            "wait_ms_max": 51.25,
            "frames": 1,
        },
        "Head (model.py:40) [compile #2 of group world]": {
            "exchanges": 3,
            "hits": 2,
            "misses": 1,
            "wait_ms_total": 0.5,
            "wait_ms_max": 0.25,
            "frames": 2,
        },
    }
    rank = {"exchanges": 10, "cost_p50_us": 1.5, "wait_p50_us": 50000.0, "regions": regions}
    return {"world_size": 2, "ranks": {"0": {**rank, "rank": 0}, "1": {**rank, "rank": 1}}}


def test_every_column_has_a_legend_entry_and_the_table_prints_it() -> None:
    assert list(LEGEND) == [h for h, _, _ in COLUMNS]
    assert list(REGION_LEGEND) == [h for h, _, _ in REGION_COLUMNS]
    assert all(text.strip() for text in [*LEGEND.values(), *REGION_LEGEND.values()])
    lines = format_table(_report()).splitlines()
    legend = lines[lines.index("columns:") + 1 :]
    assert [line.split("  ")[1].strip() for line in legend] == list(LEGEND)
    for (header, text), line in zip(LEGEND.items(), legend, strict=True):
        assert line.strip().startswith(header) and line.endswith(text)
    assert "per region:" not in lines  # only in the verbose form


def test_verbose_table_lists_each_region_per_rank() -> None:
    lines = format_table(_report(), verbose=True).splitlines()
    i = lines.index("per region:")
    assert lines[i + 1] == "  Block (model.py:12) [compile #1 of group world]"
    assert lines[i + 2] == (
        "    rank  exchanges  hits  misses  wait ms  max wait ms  frames  traced  built  loaded"
    )
    # Builds and loads are "-" where the rank had no cache to count them.
    assert lines[i + 4].split() == ["0", "7", "6", "1", "350.5", "51.25", "1", "-", "-", "-"]
    assert lines[i + 5].split() == ["1", "7", "6", "1", "350.5", "51.25", "1", "-", "-", "-"]
    assert lines[i + 6] == "  Head (model.py:40) [compile #2 of group world]"
    assert lines[i + 10].split()[:7] == ["1", "3", "2", "1", "0.5", "0.25", "2"]
    legend = lines[lines.index("region columns:") + 1 :]
    assert len(legend) == len(REGION_LEGEND)


def test_verbose_table_survives_odd_records() -> None:
    """Records come from the job's store: regions that are not objects are skipped."""
    report = {"ranks": {"0": {"regions": ["x"]}, "1": {"regions": {"r": 3, "s": {}}}}}
    lines = format_table(report, verbose=True).splitlines()
    i = lines.index("per region:")
    assert lines[i + 1] == "  s" and lines[i + 4].split()[0] == "1"
    assert "per region: none reported" in format_table({"ranks": {}}, verbose=True)


def test_cli_report_verbose(tmp_path, capsys) -> None:
    import json

    path = tmp_path / "report.json"
    path.write_text(json.dumps(_report()))
    parser = cli.build_parser()
    for argv, regions in (
        (["report", str(path)], False),
        (["report", str(path), "--verbose"], True),
    ):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
        out = capsys.readouterr().out
        assert "wait p50 us" in out and ("per region:" in out) == regions
