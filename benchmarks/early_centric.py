"""Early-centric vs full-sequence ECM training: tokens and seconds per iteration, side by side.

Both settings train the same ECM on the same backbone and data; iterations alternate between
them so that machine noise hits both alike (``ecm.bench.train_cost``; ``ecm-bench`` reports the same
with fewer iterations). Prints the measured means and their ratios.

    python benchmarks/early_centric.py                 # embedded default model
    python benchmarks/early_centric.py --iters 40 --batch 32
"""

from __future__ import annotations

import click
from ecm.runtime.errors import exit_on_error

from ecm.bench.train_cost import cost_lines, iteration_cost


@click.command()
@exit_on_error
@click.option("--iters", default=30, show_default=True, help="Timed iterations per setting.")
@click.option("--batch", default=32, show_default=True, help="Batch size.")
@click.option("--strength", default=0.8, show_default=True, help="Early-centric strength to compare with 0.")
@click.option("--warmup", default=3, show_default=True, help="Untimed iterations per setting first.")
def main(iters: int, batch: int, strength: float, warmup: int) -> None:
    """Tokens and seconds per ECM training iteration: early-centric vs full sequences."""
    cost = iteration_cost(iters, batch, strength, warmup)
    click.echo(f"model: embedded default (L = {cost['L']}, depth {cost['depth']}), batch {batch}, "
               f"{iters} iterations each")
    for line in cost_lines(cost):
        click.echo(line)


if __name__ == "__main__":
    main()
