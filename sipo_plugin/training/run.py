"""A whole run: ([pairs]: sample -> score -> make) -> train -> export -> ([evaluate])."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from ..evaluation import evaluate_run
from ..pairs.onpolicy import make_training_pairs
from ..pairs.sample import load_sampling_adapter
from .config import Config
from .exporting import export, save_interrupted
from .loop import train, use_cpu


def run(config: Config) -> dict:
    """Run the configured job; returns paths and, with eval_after_training, the evaluation."""
    start = time.time()
    if config.pairs.pairs_prompts:
        with PartialState(cpu=use_cpu(config.training)).main_process_first():  # the others then find the pairs ready
            make_training_pairs(config)
    try:
        result = train(config)
    except BaseException as err:
        save_interrupted(config, getattr(err, "interrupted", None))
        raise
    if not result.accelerator.is_main_process:  # with several processes, one writes the outputs
        return {}
    summary = {"lora": str(export(config, result)), "metrics": str(result.metrics_log)}
    if config.evaluate.eval_after_training:
        base = None
        if config.network.finetune == "full":  # no adapter to switch off: sample a fresh base
            adapter = result.adapter
            base = type(adapter).load(config.model, device=adapter.device)
        summary["eval"] = evaluate_run(config, result.adapter, base_adapter=base,
                                       objective=result.objective.name)
    summary["wall_time_s"] = round(time.time() - start, 1)
    tqdm.write(f"done in {summary['wall_time_s']} s; outputs in {config.training.output_dir}")
    return summary


def evaluate_only(config: Config) -> dict:
    """``--evaluate``: the preset's model without and with a LoRA (eval_network_weights, else the
    run's export), no training."""
    t = config.training
    lora = config.evaluate.eval_network_weights or str(Path(t.output_dir) / f"{t.output_name}.safetensors")
    if not Path(lora).is_file():
        raise ValueError(f"--evaluate: LoRA not found: {lora} (train first, or set "
                         "eval_network_weights)")
    adapter = load_sampling_adapter(config.model, cpu=use_cpu(t) or not torch.cuda.is_available(),
                                    network_weights=lora)
    Path(t.output_dir).mkdir(parents=True, exist_ok=True)
    return evaluate_run(config, LoadedLoRA(adapter))


class LoadedLoRA:
    """An adapter whose LoRA was loaded by the pipeline (``load_lora_weights``): the base is the
    same modules with diffusers' adapters disabled."""

    def __init__(self, adapter):
        self.inner = adapter

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @contextlib.contextmanager
    def reference(self):
        pipe = self.inner.sampling_pipeline()
        pipe.disable_lora()
        try:
            yield
        finally:
            pipe.enable_lora()
