"""``loyalty simulate``: post realistic activity to a running service."""

from __future__ import annotations

from typing import Annotated

import typer

from loyalty.cli.common import err, fail


def simulate(
    key: Annotated[str, typer.Option(help="an ingest key")],
    url: Annotated[str, typer.Option(help="base URL of the running service")] = (
        "http://127.0.0.1:8000"
    ),
    users: Annotated[int, typer.Option(min=1, help="distinct members (Zipf-skewed)")] = 1000,
    events: Annotated[int, typer.Option(min=1, help="events to send in all")] = 10_000,
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="events per batch")] = 500,
    rate: Annotated[float, typer.Option(min=0, help="events per second; 0 = unthrottled")] = 0,
    seed: Annotated[
        int | None, typer.Option(help="repeatable run: same users, types and event ids")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(min=0.001, help="stop after this many seconds")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="connections")] = 2,
) -> None:
    """Post realistic activity to a running service, with a live progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from loyalty.simulate import Simulation, SimulationConfig, SimulationError

    config = SimulationConfig(
        url=url,
        key=key,
        users=users,
        events=events,
        batch_size=batch_size,
        rate=rate,
        seed=seed,
        duration=duration,
        concurrency=concurrency,
    )
    columns = (
        *Progress.get_default_columns()[:1],
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    try:
        sim = Simulation(config)
    except SimulationError as exc:
        raise fail(str(exc), exc.exit_code) from None
    # Transient: the bar goes away at the end; the summary line below stays.
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("posting events", total=events)
        sim.on_progress = lambda n: progress.advance(task, n)
        try:
            result = sim.run()
        except SimulationError as exc:
            progress.stop()
            raise fail(str(exc), exc.exit_code) from None
    typer.echo(
        f"sent {result.sent} events in {result.batches} batches in {result.seconds:.1f}s: "
        f"accepted {result.accepted}, duplicates {result.duplicates}, "
        f"rejected {result.rejected}; {result.events_per_second:,.0f} events/s"
    )
