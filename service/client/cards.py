"""`bnlab cards`: list the replication cards, run them one at a time through the API, and write the
record (docs/replications.md) from what the runs measured: per card the figure, the verdict table
and the time against the estimate. HTTP only, like every user command."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from service.client.commands import _client, api_command, err, out
from service.client.http import ApiError, Client

POLL_S = 3.0


@click.group()
def cards() -> None:
    """Replication cards: a paper's claim, bnlab's experiment of it, and its verdicts."""


@cards.command("list")
@api_command
def list_cards() -> None:
    """Every card, whether this build can run it, and its quick estimate."""
    with _client() as client:
        items = client.request("GET", "/api/v1/cards")["items"]
    table = Table("card", "available", "quick runs", "estimate", "title", box=None)
    for card in items:
        estimate = card["estimated_seconds"].get("quick")
        table.add_row(
            card["name"],
            "yes" if card["available"] else "no: " + (card["unavailable_reason"] or "")[:60],
            str(card["runs"].get("quick", "-")),
            f"{estimate} s" if estimate is not None else "-",
            card["title"],
        )
    out.print(table)


@cards.command("run")
@click.argument("names", nargs=-1)
@click.option("--all", "run_all", is_flag=True, help="Every available card, one after another.")
@click.option("--scale", type=click.Choice(["test", "quick", "full"]), default="quick", show_default=True)
@click.option(
    "--write", type=click.Path(dir_okay=False, path_type=Path), help="Write the record here (markdown)."
)
@click.option("--timeout", type=float, default=900, show_default=True, help="Seconds to wait for each card.")
@click.option(
    "--reuse-latest",
    is_flag=True,
    help="Where a card's latest run has this scale, wait for it and use it instead of starting another.",
)
@api_command
def run_cards(
    names: tuple[str, ...], run_all: bool, scale: str, write: Path | None, timeout: float, reuse_latest: bool
) -> None:
    """Run cards one at a time (the next starts when the last has ended) and print each verdict."""
    if bool(names) == run_all:
        raise click.UsageError("name the cards or give --all")
    with _client() as client:
        catalogue = client.request("GET", "/api/v1/cards")["items"]
        chosen = [c for c in catalogue if run_all or c["name"] in names]
        unknown = set(names) - {c["name"] for c in catalogue}
        if unknown:
            raise click.BadParameter(f"no card named {', '.join(sorted(unknown))}", param_hint="NAMES")
        figures = write.parent / "replications" if write else None
        reports: dict[str, dict[str, Any]] = {}
        for card in chosen:
            if not card["available"]:
                err.print(f"{card['name']}: unavailable ({card['unavailable_reason']})", markup=False)
                continue
            latest = card.get("last_run") if reuse_latest else None
            reused = latest["id"] if latest and latest["scale"] == scale else None
            report = _run_one(client, card, scale, timeout, reused)
            reports[card["name"]] = report
            if figures is not None:
                figures.mkdir(parents=True, exist_ok=True)
                (figures / f"{card['name']}.png").write_bytes(_figure(client, report["figure_png"]))
                _keep_load(figures / LOADS, card["name"], report)
        if write is not None:
            write.write_text(
                record(catalogue, reports, scale, figures_dir=f"{figures.name}" if figures else "")
            )
            err.print(f"record written to {write}", markup=False)


# Beside the figures: each card run's load averages, so a record rewritten with --reuse-latest keeps them.
LOADS = "loads.json"


def _keep_load(path: Path, card: str, report: dict[str, Any]) -> None:
    """Store this run's load averages, or take them from the store when the run was reused."""
    kept: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    old = kept.get(card)
    if report["load"][0] is None and old and old["run_id"] == report["run_id"]:
        report["load"] = tuple(old["load"])
    kept[card] = {"run_id": report["run_id"], "load": list(report["load"])}
    path.write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")


def _load() -> float | None:
    """The 1-minute load average where the command runs (the API's machine under `make run`)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _run_one(
    client: Client, card: dict[str, Any], scale: str, timeout: float, reuse: str | None
) -> dict[str, Any]:
    load_at_start = _load() if reuse is None else None
    if reuse is None:
        report: dict[str, Any] = client.request(
            "POST", f"/api/v1/cards/{card['name']}", json={"scale": scale}
        )
    else:
        report = client.request("GET", f"/api/v1/cards/{card['name']}/runs/{reuse}")
    path = f"/api/v1/cards/{card['name']}/runs/{report['run_id']}"
    deadline = time.monotonic() + timeout
    while not report["finished"]:
        if time.monotonic() > deadline:
            raise ApiError(
                504, f"card {card['name']} unfinished after {timeout:.0f} s (run {report['run_id']})"
            )
        time.sleep(POLL_S)
        report = client.request("GET", path)
    report["load"] = (load_at_start, _load())
    measured, estimate = report["measured_seconds"] or 0.0, report["estimated_seconds"]
    out.print(f"{card['name']}: {measured:.0f} s (estimate {estimate} s). {report['summary']}", markup=False)
    return report


def _figure(client: Client, path: str) -> bytes:
    response = client.http.get(path)
    if response.is_error:
        raise ApiError(response.status_code, response.text)
    return response.content


# ----------------------------------------------------------------------------------- the record


def _num(value: float | None, fmt: str = "+.4f") -> str:
    return "–" if value is None else format(value, fmt)


def _claims_table(report: dict[str, Any]) -> list[str]:
    rows = [
        "| claim | contrast (metric) | n | effect [95 % CI] | p | Holm p | Hedges' g | seeds for 80 % "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["claims"]:
        interval = f"{_num(c['effect'])} [{_num(c['ci_low'])}, {_num(c['ci_high'])}]"
        if c["bootstrap_low"] is not None:
            interval += f" (BCa [{_num(c['bootstrap_low'])}, {_num(c['bootstrap_high'])}])"
        verdict = (c["verdict"] or "pending") + (f" ({c['reason']})" if c["reason"] else "")
        rows.append(
            f"| {c['sentence']} | {c['contrast']} ({c['metric']}, {c['direction']}, "
            f"smallest {c['smallest']:g}) "
            f"| {c['n']} | {interval} | {_num(c['p_value'], '.3g')} | {_num(c['adjusted_p'], '.3g')} "
            f"| {_num(c['hedges_g'], '.2f')} | {c['seeds_for_power'] or '> 10000'} | **{verdict}** |"
        )
    return rows


def _differs(card: dict[str, Any], report: dict[str, Any]) -> str:
    unsupported = [c for c in report["claims"] if c["verdict"] != "supported"]
    if not unsupported:
        return "Where bnlab differs from the paper: every claim is supported here, at this scale."

    def against(c: dict[str, Any]) -> str:
        sign = 1 if c["direction"] == "positive" else -1
        return (
            ", its effect pointing against the paper"
            if c["effect"] is not None and sign * c["effect"] < 0
            else ""
        )

    listed = "; ".join(
        f"{c['name']} is {c['verdict']}" + (f" ({c['reason']}{against(c)})" if c["reason"] else against(c))
        for c in unsupported
    )
    return f"Where bnlab differs from the paper: {listed}. Why that may be: {card['differences']}"


def cpu_name() -> str:
    """The CPU as Linux names it (the record's times are this CPU's), else Python's guess."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "an unnamed CPU"


def record(
    catalogue: list[dict[str, Any]], reports: dict[str, dict[str, Any]], scale: str, figures_dir: str
) -> str:
    """docs/replications.md: what each card measured on this machine, and which cards could not run."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Replications",
        "",
        f"Generated by `bnlab cards run --all --scale {scale} --write docs/replications.md` (or `make "
        f"replications`) against `make run` on this machine ({cpu_name()}, {os.cpu_count() or 1} "
        f"cores), {now}. Each card is run alone, one after "
        "another; times are wall times from the card's start to its last run's end. The verdict rule is "
        "fixed before any run: a claim is a contrast of configuration means evaluated per seed (seeds "
        "pair the runs), tested with a paired t-test, Holm-adjusted across the card's claims; supported "
        "needs adjusted p < 0.05, the claimed sign and at least the smallest effect that counts. The "
        "estimate is the cost model's for a quiet machine; each card gives the machine's 1-minute load "
        "average as it ran: above the core count, other jobs shared the cores and the times stretch with it.",
        "",
        "| card | ran | time (estimate) | verdicts |",
        "|---|---|---|---|",
    ]
    for card in catalogue:
        report = reports.get(card["name"])
        if report is None:
            why = "unavailable: " + card["unavailable_reason"] if not card["available"] else "not run"
            lines.append(f"| {card['name']} | – | – | {why} |")
            continue
        verdicts = ", ".join(f"{c['name']}: {c['verdict']}" for c in report["claims"])
        time_s = f"{report['measured_seconds'] or 0:.0f} s ({report['estimated_seconds']} s)"
        lines.append(
            f"| [{card['name']}](#{card['name']}) | {report['created_at'][:16]} | {time_s} | {verdicts} |"
        )
    for card in catalogue:
        lines += ["", f"## {card['name']}", "", f"**{card['title']}.** {card['citation']}.", ""]
        lines.append(f"- The paper's claim: {card['claim']}")
        lines.append(f"- The paper's setup: {card['paper_setup']}")
        for figure in card["paper_figures"]:
            mark = "verified" if figure["verified"] else "not verified: not quoted as the paper's number"
            lines.append(f"- The paper's figure ({mark}): {figure['text']}")
        lines.append(f"- bnlab's setup: {card['setup']}")
        lines.append(f"- What differs: {card['differences']}")
        report = reports.get(card["name"])
        if report is None:
            lines += ["", f"Not run here: {card['unavailable_reason'] or 'not selected'}."]
            continue
        measured = report["measured_seconds"] or 0.0
        estimate = report["estimated_seconds"]
        start, end = report.get("load", (None, None))
        load = ", ".join(
            f"{when} {value:.1f}"
            for when, value in (("at its start", start), ("at its end", end))
            if value is not None
        )
        cores = os.cpu_count() or 1
        lines += [
            "",
            f"Run {report['run_id'][:8]} at {report['scale']} scale on {report['dataset']}: "
            f"{sum(report['runs'].values())} runs, {measured:.0f} s measured against {estimate} s estimated "
            f"({(measured / estimate - 1) * 100:+.0f} %)"
            + (f"; the machine's 1-minute load average {load} on {cores} cores." if load else "."),
            "",
        ]
        if figures_dir:
            lines += [f"![{card['name']}]({figures_dir}/{card['name']}.png)", ""]
        lines += _claims_table(report)
        lines += ["", report["summary"], "", _differs(card, report)]
    return "\n".join(lines) + "\n"
