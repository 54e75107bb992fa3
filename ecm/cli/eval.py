"""``ecm-eval``: control fidelity of ECM against the backbone alone, eager or through an export."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ecm.cli.train import POSITIVE
from ecm.runtime.errors import ECMError, exit_on_error
from ecm.runtime.sampling import DEFAULT_CFG, DEFAULT_ECM_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P


@click.command()
@click.option("--ecm", "ecm_path", type=click.Path(dir_okay=False), default=None,
              help="Adapter checkpoint from ecm-train. Default: the embedded default model's.")
@click.option("--vae", "vae_path", type=click.Path(dir_okay=False), default=None,
              help="VQVAE checkpoint. Default: the one the adapters were trained with (their run.json), else the "
                   "embedded model.")
@click.option("--var", "var_path", type=click.Path(dir_okay=False), default=None,
              help="VAR checkpoint. Default: the one the adapters were trained with (their run.json), else the "
                   "embedded model.")
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="Held-out image folder to evaluate on. Default: held-out procedural shapes.")
@click.option("--num-images", default=256, type=POSITIVE, show_default=True, help="Images to evaluate.")
@click.option("--cfg", default=DEFAULT_CFG, show_default=True, help="Classifier-free guidance weight.")
@click.option("--top-k", default=DEFAULT_TOP_K, show_default=True, help="Top-k sampling (1 = greedy).")
@click.option("--top-p", default=DEFAULT_TOP_P, show_default=True, help="Top-p (nucleus) sampling.")
@click.option("--temperature", default=DEFAULT_ECM_TEMPERATURE, show_default=True,
              help="Temperature schedule: T, A:B, A:B@k or linear:A:B.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Sampling seed.")
@click.option("--grid", type=click.Path(dir_okay=False, path_type=Path), default=Path("ecm_eval.png"),
              show_default=True, help="PNG grid: condition | ECM | edge overlay | backbone alone.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as JSON here.")
@click.option("--engine", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Score an ecm-export folder run by ONNX Runtime instead of the eager model.")
@exit_on_error
def evaluate(ecm_path, vae_path, var_path, data, num_images, cfg, top_k, top_p, temperature, seed, grid,
             json_path, engine) -> None:
    """Measure control fidelity of ECM against the backbone without control (Canny: F1 of the edges)."""
    from tqdm import tqdm

    from ecm.data.controls import Control
    from ecm.data.datasets import HELD_OUT_SEED, ImageFolder, ProceduralShapes
    from ecm.eval.fidelity import evaluate as run
    from ecm.model.adapters import load_ecm
    from ecm.model.embedded import default_paths, load_backbone
    from ecm.runtime.controls import control_type
    from ecm.runtime.files import write_json
    from ecm.runtime.sampling import check_sampling
    from ecm.train.adapters import trained_backbone

    check_sampling(cfg, top_k, top_p, temperature)
    if ecm_path is not None and vae_path is None and var_path is None:
        vae_path, var_path = trained_backbone(ecm_path)
    vae, var = load_backbone(vae_path, var_path)
    ecm, _ = load_ecm(ecm_path or default_paths()[2], var)
    e = ecm.config
    if control_type(e.control).extractor is None:
        raise ECMError(f"no fidelity metric exists for {e.control} adapters: their maps come from another tool, "
                       "so ecm-eval cannot make them for held-out images; register an extractor for the control "
                       "(see the README's control types) to evaluate it")
    control = Control(e.control, None, vae.config.resolution, e.canny_low, e.canny_high)
    if data is None:
        held_out = ProceduralShapes(num_images, vae.config.resolution, HELD_OUT_SEED)
    else:
        held_out = ImageFolder(Path(data), vae.config.resolution)
    n = min(num_images, len(held_out))
    images = np.stack([held_out[i][0] for i in range(n)])
    labels = np.array([min(held_out[i][1], var.num_classes) for i in range(n)])
    bar = lambda it: tqdm(it, desc="eval", dynamic_ncols=True)  # noqa: E731
    if engine is not None:
        from ecm.eval.fidelity import evaluate_engine

        score = evaluate_engine(engine, images, labels, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature,
                                seed=seed, progress=bar)
        click.echo(f"{control.spec} {control.kind.metric} of {engine} (ONNX Runtime) on {n} held-out images: "
                   f"{score:.4f}")
        if json_path:
            write_json({"control": control.spec, "metric": control.kind.metric, "score": score, "engine": str(engine),
                        "num_images": n, "seed": seed}, json_path)
        return
    res = run(var, ecm, images, labels, control, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature,
              seed=seed, grid_path=grid, progress=bar)
    click.echo(res.table())
    click.echo(f"grid written to {grid}")
    if json_path:
        write_json({**res.to_dict(), "cfg": cfg, "top_k": top_k, "top_p": top_p, "temperature": temperature,
                    "seed": seed}, json_path)
