"""``ecm-eval``: control fidelity of ECM against the backbone alone, eager or through an export."""

from __future__ import annotations

from pathlib import Path

import click

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
              help="Held-out images: a cache from ecm-prepare or an image folder, read a batch at a time. Default: "
                   "held-out procedural shapes.")
@click.option("--control-dir", type=click.Path(file_okay=False), default=None,
              help="Folder of the held-out images' control maps, for adapters of a folder:<name> control.")
@click.option("--num-images", default=256, type=POSITIVE, show_default=True,
              help="Images to evaluate (spread evenly over --data).")
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
def evaluate(ecm_path, vae_path, var_path, data, control_dir, num_images, cfg, top_k, top_p, temperature, seed, grid,
             json_path, engine) -> None:
    """Measure control fidelity of ECM against the backbone without control (Canny: F1 of the edges)."""
    from tqdm import tqdm

    from ecm.data.cache import TokenCache, is_cache
    from ecm.data.controls import Control
    from ecm.eval.fidelity import EVAL_BATCH
    from ecm.eval.fidelity import evaluate as run
    from ecm.eval.held_out import CacheHeldOut, FolderHeldOut, ProceduralHeldOut
    from ecm.model.adapters import load_ecm
    from ecm.model.embedded import default_paths, load_backbone
    from ecm.runtime.controls import scoring_control
    from ecm.runtime.files import write_json
    from ecm.runtime.manifest import ControlSpec
    from ecm.runtime.sampling import check_sampling
    from ecm.train.adapters import trained_backbone
    from ecm.train.prepare import cache_key

    check_sampling(cfg, top_k, top_p, temperature)
    if ecm_path is not None and vae_path is None and var_path is None:
        vae_path, var_path = trained_backbone(ecm_path)
    vae, var = load_backbone(vae_path, var_path)
    ecm, _ = load_ecm(ecm_path or default_paths()[2], var)
    e, res = ecm.config, vae.config.resolution
    kind = scoring_control(e.control)
    if data is not None and is_cache(Path(data)):
        held_out = CacheHeldOut(TokenCache(data, cache_key(vae, e.control, e.canny_low, e.canny_high)), num_images)
    else:
        control = Control(e.control, Path(control_dir) if control_dir else None, res, e.canny_low, e.canny_high)
        if data is None and control.from_folder:
            raise ECMError(f"{e.control} adapters take maps made by another tool: pass --data with held-out images "
                           "and --control-dir with their maps, or a cache of them")
        held_out = ProceduralHeldOut(num_images, control) if data is None else \
            FolderHeldOut(Path(data), num_images, control)
    spec = ControlSpec(e.control, res, e.canny_low, e.canny_high)
    bar = lambda it: tqdm(it, desc="eval", total=-(-len(held_out) // EVAL_BATCH), dynamic_ncols=True)  # noqa: E731
    n = len(held_out)
    if engine is not None:
        from ecm.eval.fidelity import evaluate_engine

        score = evaluate_engine(engine, held_out, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature,
                                seed=seed, progress=bar)
        click.echo(f"{e.control} {kind.metric} of {engine} (ONNX Runtime) on {n} held-out images: {score:.4f}")
        if json_path:
            write_json({"control": e.control, "metric": kind.metric, "score": score, "engine": str(engine),
                        "num_images": n, "seed": seed}, json_path)
        return
    res = run(var, ecm, held_out, kind, spec, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature,
              seed=seed, grid_path=grid, progress=bar)
    click.echo(res.table())
    click.echo(f"grid written to {grid}")
    if json_path:
        write_json({**res.to_dict(), "cfg": cfg, "top_k": top_k, "top_p": top_p, "temperature": temperature,
                    "seed": seed}, json_path)
