"""End to end on the bundled toy model: every objective trains, exports and is deterministic."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sipo_plugin.models import get_model_adapter
from sipo_plugin.models.peft_lora import set_lora_enabled
from sipo_plugin.objectives import available_objectives
from sipo_plugin.toy.domain import all_prompts, render_prompt
from sipo_plugin.training.config import load_config
from sipo_plugin.training.loop import train
from sipo_plugin.training.run import run

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_OBJECTIVES = ["diffusion-dpo", "dpo-cm", "sft", "sipo"]


def make_rendered_pairs(folder: Path, n_pairs: int = 8, seed: int = 0) -> Path:
    """Ground-truth renders as a JSONL pair manifest: the more saturated shape is preferred."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    prompts = all_prompts()
    for i in range(n_pairs):
        prompt = prompts[int(rng.integers(len(prompts)))]
        for name, saturation in (("w", 1.0), ("l", 0.4)):
            image = render_prompt(prompt, rng, saturation=saturation)
            Image.fromarray(image).save(folder / "img" / f"{i:03d}_{name}.png")
        rows.append({"prompt": prompt, "chosen": f"img/{i:03d}_w.png", "rejected": f"img/{i:03d}_l.png"})
    manifest = folder / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def short_run(manifest: Path, output_dir: Path, *extra: str):
    return load_config(None, ["--train_data", str(manifest), "--resolution", "32",
                              "--output_dir", str(output_dir), "--max_train_steps", "3",
                              "--train_batch_size", "2", "--learning_rate", "1e-3",
                              "--calibration_pairs", "4", "--logging_steps", "1", *extra])


class Log:
    """Records the lines a training step logs (the ``log.info`` of MetricsLogger)."""

    def __init__(self):
        self.lines = []

    def info(self, text):
        self.lines.append(text)


def straight_and_resumed(manifest: Path, tmp_path: Path, *common: str):
    """The run ``common`` (saving twice) straight through in ``a/``, and again in ``b/`` resumed
    from a copy of its first checkpoint: (straight, resumed) TrainResults."""
    import shutil

    from sipo_plugin.training.checkpoint import list_checkpoints
    straight = train(short_run(manifest, tmp_path / "a", *common))
    halfway = list_checkpoints(tmp_path / "a")[0]
    shutil.copytree(halfway, tmp_path / "b" / "checkpoints" / halfway.name)
    return straight, train(short_run(manifest, tmp_path / "b", *common, "--resume", "latest"))


def assert_same_trained_weights(a, b) -> None:
    """Two TrainResults' trained tensors (LoRA or full U-Net) are bit-identical."""
    from sipo_plugin.training.result import lora_state
    a, b = lora_state(a.adapter), lora_state(b.adapter)
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)


def load_adapter(config):
    """The adapter of ``config``'s model family, loaded on the CPU."""
    return get_model_adapter(config.model.family).load(config.model, device=torch.device("cpu"))


def lora_weights(adapter) -> dict:
    return {k: v.detach().clone() for k, v in adapter.unet.state_dict().items() if "lora_" in k}


def test_every_builtin_objective_is_registered():
    assert set(BUILTIN_OBJECTIVES) <= set(available_objectives())


@pytest.mark.slow
@pytest.mark.parametrize("objective", BUILTIN_OBJECTIVES)
def test_short_run_trains_and_exports(objective, manifest, tmp_path):
    config = short_run(manifest, tmp_path, "--objective", objective)
    summary = run(config)
    lora = load_file(summary["lora"])
    ups = [v for k, v in lora.items() if k.endswith("lora_up.weight")]
    assert ups and any(v.abs().max() > 0 for v in ups), "LoRA did not move from its zero init"
    assert all(torch.isfinite(v).all() for v in lora.values())
    rows = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    logged = [r for r in rows if "step" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert all(np.isfinite(r["train/loss"]) for r in logged)
    if objective != "sft":
        assert "train/implicit_acc" in logged[0]


@pytest.mark.slow
def test_same_seed_same_lora_and_other_seed_differs(manifest, tmp_path):
    a = train(short_run(manifest, tmp_path / "a"))
    b = train(short_run(manifest, tmp_path / "b"))
    c = train(short_run(manifest, tmp_path / "c", "--seed", "7"))
    wa, wb, wc = lora_weights(a.adapter), lora_weights(b.adapter), lora_weights(c.adapter)
    assert wa.keys() == wb.keys() and len(wa) > 0
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_pair_weights_give_a_weighted_mean_of_per_pair_losses():
    from sipo_plugin.objectives import ObjectiveOutput
    from sipo_plugin.training.loop import weighted_pair_loss
    per_pair = torch.tensor([1.0, 4.0])
    out = ObjectiveOutput(loss=per_pair.mean(), metrics={}, per_pair_loss=per_pair)
    assert weighted_pair_loss(out, torch.ones(2)) is out.loss
    assert weighted_pair_loss(out, torch.tensor([1.0, 3.0])).item() == pytest.approx((1 + 12) / 4)


@pytest.mark.slow
def test_text_encoder_lora_trains_exports_and_is_off_in_the_reference(manifest, tmp_path):
    config = short_run(manifest, tmp_path, "--train_text_encoder", "true", "--objective", "diffusion-dpo")
    result = train(config)
    adapter = result.adapter
    prompts = ["a red circle on a gray background"]
    with torch.no_grad():
        tuned = adapter.encode_prompts(prompts)["encoder_hidden_states"]
        with adapter.reference():
            reference = adapter.encode_prompts(prompts)["encoder_hidden_states"]
        set_lora_enabled(adapter.text_encoder, False)
        base = adapter.text_encoder(adapter.tokenizer(prompts, padding="max_length",
                                    return_tensors="pt").input_ids)[0]
        set_lora_enabled(adapter.text_encoder, True)
    assert torch.equal(reference, base)
    assert not torch.allclose(tuned, reference), "the text-encoder LoRA did not train"
    from sipo_plugin.training.run import export
    keys = load_file(export(config, result)).keys()
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)
    assert any(k.startswith("lora_unet_") for k in keys)


@pytest.mark.slow
def test_interrupted_then_resumed_run_ends_with_the_same_lora(manifest, tmp_path):
    import shutil
    from sipo_plugin.training.checkpoint import list_checkpoints
    from sipo_plugin.training.loop import lora_state
    common = ["--max_train_steps", "4", "--gradient_accumulation_steps", "2", "--lr_scheduler",
              "linear", "--save_every_n_steps", "2"]
    straight = train(short_run(manifest, tmp_path / "a", *common, "--save_last_n", "2"))
    halfway, final = list_checkpoints(tmp_path / "a")
    assert (halfway.name, final.name) == ("step_0000002", "step_0000004")
    # a run killed after step 2 has exactly this checkpoint on disk: resume from it
    shutil.copytree(halfway, tmp_path / "b" / "checkpoints" / halfway.name)
    resumed = train(short_run(manifest, tmp_path / "b", *common, "--resume", "latest"))
    assert resumed.steps == 4
    a, b = lora_state(straight.adapter), lora_state(resumed.adapter)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step_0000002", "step_0000004"]


def test_lr_schedule_is_the_same_for_every_process_count(monkeypatch):
    """accelerate's prepared scheduler ticks once per process at each optimizer step: with two
    processes, a linear warm-up/decay over the steps must still give the one-process rates."""
    from types import SimpleNamespace
    import accelerate.scheduler
    from sipo_plugin.training.loop import make_lr_scheduler
    training = SimpleNamespace(lr_scheduler="linear", lr_warmup_steps=2, max_train_steps=6)

    def rates(num_processes: int) -> list[float]:
        monkeypatch.setattr(accelerate.scheduler, "AcceleratorState",
                            lambda: SimpleNamespace(num_processes=num_processes))
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = accelerate.scheduler.AcceleratedScheduler(
            make_lr_scheduler(optimizer, training, num_processes),
            [SimpleNamespace(step_was_skipped=False)])
        scheduler.gradient_state = SimpleNamespace(sync_gradients=True)  # every call is a step
        out = []
        for _ in range(training.max_train_steps):
            scheduler.step()
            out.append(scheduler.get_last_lr()[0])
        return out

    # warm-up to 1.0 over 2 steps, then linear to 0 at step 6
    assert rates(1) == pytest.approx([0.5, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert rates(2) == pytest.approx(rates(1))
