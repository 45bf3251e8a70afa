"""The built-in objectives' hyper-parameter dataclasses, importable without torch.

Config parsing and ``--check`` read them (names, defaults, ranges) without loading the loss code;
each objective module imports its class from here and registers it with its loss function.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .validation import check_choice, check_float

__all__ = ["BUILTIN_CONFIGS", "DPOCMConfig", "DiffusionDPOConfig", "LOSS_TYPES", "PAIR_WEIGHTS",
           "SFTConfig", "SIPO1427Config", "SIPOConfig", "WEIGHT_MODELS", "check_kappa"]

LOSS_TYPES = ("sigmoid", "hinge")
WEIGHT_MODELS = ("step", "reference")
PAIR_WEIGHTS = ("per_side", "shared_max")


@dataclass(frozen=True)
class DiffusionDPOConfig:
    """Hyper-parameters of Diffusion-DPO (and the base of the weighted objectives' configs)."""

    beta: float = field(
        default=5000.0,
        metadata={
            "help": "KL strength, u = -(beta/2)(d_w - d_l); the diffusers script's 2500 = 5000 here"
        },
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "conservative-DPO label noise a in [0, 0.5] (sigmoid only)"}
    )
    loss_type: str = field(
        default="sigmoid", metadata={"help": "'sigmoid' or 'hinge' (max(0, 1 - u))"}
    )
    sft_weight: float = field(
        default=0.0, metadata={"help": "adds sft_weight * mean(m_w), a supervised term on winners"}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", check_float("beta", self.beta, low=0.0, low_open=True))
        smoothing = check_float("label_smoothing", self.label_smoothing, low=0.0, high=0.5)
        object.__setattr__(self, "label_smoothing", smoothing)
        object.__setattr__(self, "loss_type", check_choice("loss_type", self.loss_type, LOSS_TYPES))
        object.__setattr__(self, "sft_weight", check_float("sft_weight", self.sft_weight, low=0.0))
        if self.loss_type == "hinge" and self.label_smoothing > 0:
            raise ValueError(
                "label_smoothing applies to loss_type='sigmoid' only; set it to 0 for hinge"
            )



def check_kappa(kappa: object, weight_model: str, mask_threshold: float) -> float | str:
    """``"auto"`` (step model, tau > 0) or a positive finite float."""
    if isinstance(kappa, str):
        if kappa != "auto":
            raise ValueError(f"kappa must be 'auto' or a positive number, got {kappa!r}")
        if weight_model == "reference":
            raise ValueError(
                "kappa='auto' cannot be calibrated for weight_model='reference' (policy == "
                "reference at calibration, so every weight is 1): set kappa to a number"
            )
        if mask_threshold == 0:
            raise ValueError(
                "kappa='auto' calibrates the masked fraction, which needs mask_threshold > 0: "
                "set kappa to a number or raise mask_threshold"
            )
        return kappa
    return check_float("kappa", kappa, low=0.0, low_open=True)



@dataclass(frozen=True)
class DPOCMConfig(DiffusionDPOConfig):
    """Hyper-parameters of DPO-C&M (Diffusion-DPO's plus the importance-weight ones)."""

    clip_eps: float = field(default=0.1, metadata={"help": "weights clipped to [1-eps, 1+eps]"})
    mask_threshold: float = field(
        default=0.9, metadata={"help": "tau: pairs with a raw weight below tau are masked"}
    )
    kappa: float | str = field(
        default="auto",
        metadata={"help": "weight temperature; 'auto' calibrates it before training"},
    )
    target_mask_fraction: float = field(
        default=0.06, metadata={"help": "share of pairs masked at calibration (kappa='auto')"}
    )
    weight_model: str = field(
        default="step", metadata={"help": "'step' (schedule KL) or 'reference' (policy/reference)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "clip_eps": check_float("clip_eps", self.clip_eps, low=0.0, high=1.0, high_open=True),
            "mask_threshold": check_float(
                "mask_threshold", self.mask_threshold, low=0.0, high=1.0, high_open=True
            ),
            "target_mask_fraction": check_float(
                "target_mask_fraction", self.target_mask_fraction, low=0.0, high=1.0, high_open=True
            ),
            "weight_model": check_choice("weight_model", self.weight_model, WEIGHT_MODELS),
        }
        for name, value in checks.items():
            object.__setattr__(self, name, value)
        kappa = check_kappa(self.kappa, self.weight_model, self.mask_threshold)
        object.__setattr__(self, "kappa", kappa)



@dataclass(frozen=True)
class SIPOConfig(DPOCMConfig):
    """Hyper-parameters of SIPO (DPO-C&M's plus ``pair_weight``)."""

    pair_weight: str = field(
        default="per_side",
        metadata={"help": "'per_side': c_w d_w - c_l d_l; 'shared_max': max(c_w, c_l)(d_w - d_l)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        pair_weight = check_choice("pair_weight", self.pair_weight, PAIR_WEIGHTS)
        object.__setattr__(self, "pair_weight", pair_weight)



@dataclass(frozen=True)
class SIPO1427Config(DiffusionDPOConfig):
    """Hyper-parameters of ``sipo-1427`` (sd-scripts PR #1427's reading of SDPO)."""

    clip_eps: float = field(
        default=0.1, metadata={"help": "inverse weights clipped to [1-eps, 1+eps] (PR's sdpo_epsilon)"}
    )
    kappa: float = field(
        default=1.0, metadata={"help": "weight temperature: 1/w = exp(kappa (m - r)); 1 is the PR's"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        clip_eps = check_float("clip_eps", self.clip_eps, low=0.0, high=1.0, high_open=True)
        object.__setattr__(self, "clip_eps", clip_eps)
        object.__setattr__(self, "kappa", check_float("kappa", self.kappa, low=0.0, low_open=True))



@dataclass(frozen=True)
class SFTConfig:
    """SFT takes no hyper-parameters."""



# name -> hyper-parameter class of every built-in objective (the registry holds the same pairs)
BUILTIN_CONFIGS = {"diffusion-dpo": DiffusionDPOConfig, "dpo-cm": DPOCMConfig, "sipo": SIPOConfig,
                   "sipo-1427": SIPO1427Config, "sft": SFTConfig}
