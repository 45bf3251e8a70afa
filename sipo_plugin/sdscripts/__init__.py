"""kohya-ss/sd-scripts habits: its training config files (``--config_file``), dataset configs
(``--dataset_config``) and option spellings, mapped onto this project's settings.

Import-light on purpose (no torch): the config and ``--check`` path reads these modules.
"""
