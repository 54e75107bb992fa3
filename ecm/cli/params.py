"""``ecm-params``: exact ECM parameter counts per backbone preset."""

from __future__ import annotations

import click

from ecm.runtime.errors import exit_on_error


@click.command()
@click.option("--preset", "presets", multiple=True, default=("tiny", "d16", "d20", "d24", "d30"), show_default=True,
              help="Backbone presets to report (repeatable).")
@exit_on_error
def params(presets) -> None:
    """Print exact ECM parameter counts per backbone preset, and their share of the backbone."""
    import torch

    from ecm.model.adapters import ECM, count_parameters, ecm_config
    from ecm.model.config import VAR_PRESET_VAE, var_config, vqvae_config
    from ecm.model.var import VAR

    click.echo(f"{'backbone':10}{'backbone params':>18}{'ECM params':>14}{'share':>9}  adapters at blocks")
    for name in presets:
        vae_cfg = vqvae_config(VAR_PRESET_VAE.get(name, "official"))
        with torch.device("meta"):
            var = VAR(var_config(name, vae=vae_cfg))
            ecm = ECM(ecm_config(var.config, vae_cfg.downsample))
        nb, ne = count_parameters(var), count_parameters(ecm)
        click.echo(f"{name:10}{nb:18,}{ne:14,}{ne / nb:9.2%}  {list(ecm.config.positions)}")
