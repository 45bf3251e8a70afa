"""LoRA export: sd-scripts (kohya) keys for WebUI/ComfyUI, the diffusers/PEFT layout, Wan's and
CogVideoX's own; `write_lora` picks the writer by (family, lora_format) (registry.py).

Names load from their modules on first use: reading a LoRA file's header (``lora_file``, for
config checks) needs no torch.
"""

from __future__ import annotations

from ..utils.lazy import lazy_getattr, module_of_names

_EXPORTS = {
    "diffusers_format": ("DIFFUSERS_WEIGHT_NAME", "peft_to_diffusers"),
    "kohya": ("kohya_module_name", "peft_to_kohya"),
    "lora": ("LORA_FORMATS", "export_lora"),
    "cogvideox": ("export_cogvideox_lora",),
    "metadata": ("addnet_hash_legacy", "addnet_hash_safetensors", "build_metadata",
                 "sd_scripts_hashes", "with_hashes"),
    "peft_state": ("lora_state_of", "split_peft_state_dict"),
    "registry": ("lora_formats_of", "lora_writer", "register_lora_writer", "write_lora"),
    "sgm_names": ("sgm_block_prefixes", "sgm_module_namer", "sgm_unet_module_path"),
    "wan": ("WAN_LORA_FORMATS", "export_wan_lora", "wan_module_name"),
}
_MODULE_OF = module_of_names(_EXPORTS)
__all__ = sorted(_MODULE_OF)
__getattr__ = lazy_getattr(__name__, _MODULE_OF, globals())
