"""LoRA export: sd-scripts (kohya) keys for WebUI/ComfyUI, or the diffusers/PEFT layout."""

from .diffusers_format import DIFFUSERS_WEIGHT_NAME, peft_to_diffusers
from .kohya import kohya_module_name, peft_to_kohya
from .lora import LORA_FORMATS, export_lora
from .metadata import (
    addnet_hash_legacy,
    addnet_hash_safetensors,
    build_metadata,
    sd_scripts_hashes,
    with_hashes,
)
from .peft_state import lora_state_of, split_peft_state_dict
from .sgm_names import sgm_block_prefixes, sgm_module_namer, sgm_unet_module_path
from .wan import WAN_LORA_FORMATS, export_wan_lora, wan_module_name

__all__ = [
    "DIFFUSERS_WEIGHT_NAME",
    "WAN_LORA_FORMATS",
    "LORA_FORMATS",
    "addnet_hash_legacy",
    "addnet_hash_safetensors",
    "build_metadata",
    "export_lora",
    "export_wan_lora",
    "kohya_module_name",
    "lora_state_of",
    "peft_to_diffusers",
    "peft_to_kohya",
    "sd_scripts_hashes",
    "sgm_block_prefixes",
    "sgm_module_namer",
    "sgm_unet_module_path",
    "split_peft_state_dict",
    "wan_module_name",
    "with_hashes",
]
