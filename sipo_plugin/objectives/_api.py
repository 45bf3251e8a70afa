"""The objectives' public API (imports torch); ``sipo_plugin.objectives`` loads it on first use."""


from .errors import LossOutput, PairErrors, per_sample_error, split_pair
from .registry import (
    ENTRY_POINT_GROUP,
    CalibrationSample,
    Objective,
    ObjectiveOutput,
    ObjectiveSpec,
    UnknownObjectiveError,
    available_objectives,
    describe_objectives,
    get_objective,
    get_objective_spec,
    register_objective,
)
from .importance import ImportanceWeights, calibrate_kappa, first_kept_timestep, step_log_weight
from .schedule import parametrization, schedule_error_factor, snr

# Built-in objectives register themselves on import.
from .diffusion_dpo import DiffusionDPOConfig, diffusion_dpo_loss  # noqa: E402
from .dpo_cm import DPOCMConfig, dpo_cm_loss  # noqa: E402
from .sipo import SIPOConfig, sipo_loss  # noqa: E402
from .sipo_1427 import SIPO1427Config, sipo_1427_loss  # noqa: E402
from .sft import SFTConfig, sft_loss  # noqa: E402

