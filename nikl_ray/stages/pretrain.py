"""The pretrain stage: adapt a backbone to unlabeled in-domain text before the folds.

    nikl-ray pretrain --config my.yaml --local
    ray job submit --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/pretrain.py --config my.yaml

For every backbone with a `pretrain:` section: its corpus is read (NFC, deduplicated; the task's
test file left out unless `include_test`), a held-out slice kept for perplexity, and one Ray
Train run with several data-parallel workers continues its pretraining (masked LM for encoders,
causal LM for decoders) for its minutes or steps. The checkpoint (`pretrain/<backbone>/model`,
safetensors + tokenizer) is where the later stages start that backbone from; the manifest keeps
the corpus hash, steps and loss curve, so a rerun skips it, and a killed run resumes from its
last checkpoint. A tiny backbone's tokenizer is trained on that corpus (config.build_tiny); a
public checkpoint keeps its own.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nikl_ray.artifacts import fresh_run_dir, manifest_problem, read_json, write_manifest, write_text
from nikl_ray.config import Experiment
from nikl_ray.corpus import corpus_hash, pretrain_corpus, split_heldout
from nikl_ray.pretraining import PretrainRun, pretrain_loop
from nikl_ray.runfiles import final_path
from nikl_ray.tables import markdown
from nikl_ray.tracking import target

log = logging.getLogger(__name__)


def inputs_of(exp: Experiment, spec) -> dict:
    exclude = [] if spec.pretrain.include_test or not exp.test else [exp.test]
    return {"checkpoint": spec.checkpoint, "family": spec.family, "objective": spec.objective,
            "pretrain": spec.pretrain.model_dump(mode="json"), "corpus": corpus_hash(spec.pretrain.corpus, exclude)}


def run(exp: Experiment, backbones: list[str] | None = None) -> dict[str, Path]:
    """Pretrain every configured backbone not already done. Returns {backbone: checkpoint}."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from nikl_ray.cluster import plan_stage
    from nikl_ray.launcher import guarded_trainer, start_guardian

    layout, out = exp.layout, {}
    specs = [s for s in exp.backbones if s.pretrain and (backbones is None or s.name in backbones)]
    for spec in specs:
        d, inputs = layout.pretrain(spec.name), inputs_of(exp, spec)
        why = manifest_problem(d, inputs, __name__)
        if why is None:
            log.info("pretrain %s: done already (%s)", spec.name, layout.pretrained(spec.name))
            out[spec.name] = layout.pretrained(spec.name)
            continue
        fresh_run_dir(d, inputs, __name__)  # made for another corpus or config: Ray Train must not resume it
        texts, info = pretrain_corpus(exp, spec)
        train_texts, held = split_heldout(texts, spec.pretrain.heldout, spec.pretrain.seed)
        for path in info["left_out"]:
            log.info("pretrain %s: %s left out (the task's test rows; include_test: true pretrains on them)", spec.name, path)
        stage = plan_stage(exp, [spec.model_copy(update={"mode": "full"})])  # every weight trains
        p, device = stage.placements[spec.name], stage.device
        cpus = spec.pretrain.cpus_per_worker or p.cpus
        workers = spec.pretrain.num_workers or (int(stage.shape.gpus) if device.schedule_gpu else max(1, int(stage.shape.cpus // cpus)))
        # DDP needs a card per worker (NCCL does not share one): a whole card each on GPU
        resources = {"CPU": cpus, "GPU": 1} if device.schedule_gpu else {"CPU": cpus}
        run_ = PretrainRun(spec, ray.put(train_texts), ray.put(held), f"{spec.name}-pretrain", str(d), str(layout.pretrained(spec.name)),
                           workers, device.device, device.precision(spec), resources, exp.resources.max_failures,
                           target(exp, "pretrain"))
        budget = f"{spec.pretrain.minutes:g} min" if spec.pretrain.minutes else f"{spec.pretrain.steps} steps"
        log.info("pretrain %s: %s (%s) on %d texts (%d held out; %s) for %s with %d worker(s): %s", spec.name,
                 spec.objective, why, len(train_texts), len(held), ", ".join(f"{Path(k).name} {v}" for k, v in
                                                                            info["sources"].items()), budget, workers, resources)
        start_guardian()
        # TorchTrainer's backend (a process group for DDP) through the launcher's trainer
        trainer = guarded_trainer(
            pretrain_loop, train_loop_config={"run": run_}, backend_config=TorchConfig(backend="nccl" if device.device == "cuda" else "gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=device.schedule_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=run_.name, storage_path=str(d), failure_config=FailureConfig(max_failures=exp.resources.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1), logging_config=LoggingConfig(log_level="WARNING")))
        trainer.fit()
        final = read_json(final_path(d, run_.name))
        workers_seen = [read_json(f) for f in sorted((d / run_.name).glob("worker*.json"))]
        report = write_report(exp.layout.pretrain_report(spec.name), spec, info, final, workers_seen, len(train_texts),
                              len(held))
        files = [f for f in layout.pretrained(spec.name).iterdir() if f.suffix in (".safetensors", ".json")]
        write_manifest(d, inputs=inputs, files=files + [report], code=__name__,
                       extra={"steps": final["steps"], "loss_curve": final["loss_curve"],
                              "heldout_perplexity": final["heldout_perplexity"], "corpus": info, "workers": workers_seen,
                              "resumed_from_step": final["resumed_from_step"]})
        log.info("pretrain %s: %d steps, held-out perplexity %.1f → %s", spec.name, final["steps"],
                 final["heldout_perplexity"] or float("nan"), layout.pretrained(spec.name))
        out[spec.name] = layout.pretrained(spec.name)
    return out


def write_report(path: Path, spec, info: dict, final: dict, workers: list[dict], n_train: int, n_held: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nikl_ray.artifacts import atomic_path

    curve = final["loss_curve"]
    if curve:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([c["step"] for c in curve], [c["loss"] for c in curve])
        ax.set(title=f"{spec.name}: {spec.objective} pretraining", xlabel="step", ylabel="training loss")
        fig.tight_layout()
        with atomic_path(path.with_suffix(".png")) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
    lines = [f"# Pretraining {spec.name}\n",
             f"{spec.objective} on {n_train} texts ({n_held} held out for perplexity), {final['steps']} steps, "
             f"{final['tokens_seen']} tokens, {final['seconds'] or 0:.0f} s; held-out perplexity "
             f"{final['heldout_perplexity'] or float('nan'):.2f}.\n",
             "Corpus (NFC, deduplicated): " + ", ".join(f"{k} ({v} texts)" for k, v in info["sources"].items())
             + f"; {info['unique']} unique texts."
             + (f" Left out: {', '.join(info['left_out'])} (the task's test rows)." if info["left_out"] else "") + "\n",
             "## Workers\n", markdown(workers), "## Loss curve\n", markdown(curve), "![loss](report.png)\n"]
    return write_text(path, "\n".join(lines))
