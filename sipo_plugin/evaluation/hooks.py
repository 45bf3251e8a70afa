"""The training loop's evaluation hooks: a step-0 sample of the base model and the reward curve
(``evaluate_every_n_steps``), on the main process, with the encoders on the device."""

from __future__ import annotations


class TrainingEvaluation:
    def __init__(self, config, adapter, log, accelerator):
        self.config, self.adapter, self.log = config, adapter, log
        self.enabled = accelerator.is_main_process
        self.every = config.evaluate.evaluate_every_n_steps
        self.curve = None

    def at_start(self, step: int) -> None:
        """Before the first step of a fresh run: sample images and a curve point of the base."""
        if not self.enabled or step != 0:
            return
        from ..training.sampling import save_samples
        t = self.config.training
        with self.adapter.encoders_on_device():
            if t.sample_every_n_steps:
                save_samples(self.adapter, t, 0)
            if self.every:
                self._curve_point(0)

    def after_step(self, step: int) -> None:
        if self.enabled and self.every and (step % self.every == 0
                                            or step == self.config.training.max_train_steps):
            with self.adapter.encoders_on_device():
                self._curve_point(step)

    def _curve_point(self, step: int) -> None:
        from .evaluate import RewardCurve
        if self.curve is None:
            self.curve = RewardCurve(self.config, self.adapter)
        values = self.curve.log(self.adapter, self.log, step)
        self.log.info(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
