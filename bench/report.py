"""The table bench.compare prints: per scenario, one row per server and their ratio."""

from __future__ import annotations

from typing import Any

COLUMNS = [
    # (heading, result key, format, better when the ratio is ...)
    ("deliveries/s", "deliveries_per_s", "{:,.0f}", "higher"),
    ("per CPU-s", "deliveries_per_cpu_s", "{:,.0f}", "higher"),
    ("p50 ms", "p50_ms", "{:.2f}", "lower"),
    ("p99 ms", "p99_ms", "{:.2f}", "lower"),
    ("KiB/conn", "rss_kib_per_conn", "{:.1f}", "lower"),
]
LEGEND = """\
ratio = streamer / reference
  deliveries/s, per CPU-s (deliveries per second of server CPU): higher is better
  p50, p99 (publish to receipt), KiB/conn (serving process RSS per client): lower is better
kernel: the share of the server's CPU time spent in the kernel (its system calls, the
  writes to the clients' sockets above all; from clock ticks, "-" when too few)
load CPU: the load generator's own CPU use in the measured phase (near 100%: it is the limit)"""


def _cell(result: dict[str, Any], key: str, form: str) -> str:
    value = result.get(key)
    return "-" if value is None else form.format(value)


def _ratio(streamer: dict[str, Any] | None, reference: dict[str, Any] | None, key: str) -> str:
    if streamer is None or reference is None:
        return "-"
    mine, theirs = streamer.get(key), reference.get(key)
    if mine is None or not theirs:
        return "-"
    return f"x{mine / theirs:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    headings = [
        *("scenario", "server", "connected"),
        *(c[0] for c in COLUMNS),
        *("kernel", "lost", "load CPU"),
    ]
    rows: list[list[str]] = []
    scenarios = list(dict.fromkeys(result["scenario"] for result in results))
    for name in scenarios:
        by_server = {r["server"]: r for r in results if r["scenario"] == name}
        for server in ("reference", "streamer"):
            result = by_server.get(server)
            if result is None:
                continue
            rows.append(
                [
                    name,
                    server,
                    f"{result['connected']}/{result['clients']}",
                    *(_cell(result, key, form) for _, key, form, _ in COLUMNS),
                    _cell(result, "server_kernel_pct", "{:.0f}%"),
                    str(result["lost"]),
                    _cell(result, "load_cpu_pct", "{:.0f}%"),
                ]
            )
        ratios = [
            _ratio(by_server.get("streamer"), by_server.get("reference"), c[1]) for c in COLUMNS
        ]
        rows.append([name, "streamer/reference", "", *ratios, "", "", ""])
    widths = [max(len(row[i]) for row in [headings, *rows]) for i in range(len(headings))]

    def line(row: list[str]) -> str:
        cells = [
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([line(headings), *(line(row) for row in rows), "", LEGEND])
