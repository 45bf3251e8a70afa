"""The adapter interface: what the rest of the package reads on an adapter is declared on
ModelAdapter, every family implements all of it, and export is keyed by (family, lora_format)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from sipo_plugin.export import registry as export_registry
from sipo_plugin.models import available_model_families, get_model_adapter
from sipo_plugin.models.base import ModelAdapter
from sipo_plugin.models.families import FAMILIES

PACKAGE = Path(__file__).resolve().parents[1] / "sipo_plugin"


def declared(cls: type) -> set[str]:
    """Names a class declares: attributes, methods, properties and bare annotations (MRO)."""
    names = set(dir(cls))
    for klass in cls.__mro__:
        names |= set(getattr(klass, "__annotations__", {}))
    return names


def attributes_read_on_adapters() -> dict[str, str]:
    """{attribute: first place} for every ``<...>adapter.<attribute>`` outside models/."""
    found = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        if file.parent.name == "models":
            continue
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value
            name = owner.id if isinstance(owner, ast.Name) else (
                owner.attr if isinstance(owner, ast.Attribute) else "")
            if name.endswith("adapter"):
                found.setdefault(node.attr, f"{file.relative_to(PACKAGE)}:{node.lineno}")
    return found


def test_every_attribute_read_on_an_adapter_is_declared():
    read = attributes_read_on_adapters()
    assert {"predict", "noise_scheduler", "first_timestep"} <= set(read)  # the scan sees reads
    missing = {attr: where for attr, where in read.items() if attr not in declared(ModelAdapter)}
    assert not missing, f"read on adapters but not declared on ModelAdapter: {missing}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_implements_the_interface(family):
    cls = get_model_adapter(family)
    assert cls.family == family
    assert not cls.__abstractmethods__
    assert cls.base_model_version and cls.modelspec_architecture.endswith("/lora")
    assert cls.is_video == bool(FAMILIES[family].video_size_multiple)
    # what a preset may ask for (families.py, torch-free) is what export/ can write
    assert export_registry.lora_formats_of(family) == FAMILIES[family].lora_formats
    assert sorted(FAMILIES) == available_model_families()


def test_an_unknown_format_names_the_familys_formats():
    with pytest.raises(ValueError, match="'kohya' is not a Wan LoRA format; use 'wan' or 'musubi'"):
        export_registry.lora_writer("wan", "kohya")
    with pytest.raises(ValueError, match="not a CogVideoX LoRA format; use 'diffusers'"):
        export_registry.write_lora("cogvideox", "kohya", "x.safetensors", {}, network_alpha=1.0)


def test_a_plugin_family_writes_through_its_registered_writer(monkeypatch, tmp_path):
    monkeypatch.setattr(export_registry, "_WRITERS", dict(export_registry._WRITERS))
    calls = []

    def writer(path, components, *, network_alpha, metadata, save_dtype):
        calls.append((path, sorted(components), network_alpha, metadata, save_dtype))
        return Path(path)

    export_registry.register_lora_writer("mine", "native", writer)
    assert export_registry.lora_formats_of("mine") == ("native",)
    out = export_registry.write_lora("mine", "native", tmp_path / "a", {"unet": torch.nn.Linear(1, 1)},
                                     network_alpha=4.0, metadata={"k": "v"}, save_dtype=torch.float16)
    assert out == tmp_path / "a"
    assert calls == [(tmp_path / "a", ["unet"], 4.0, {"k": "v"}, torch.float16)]
    with pytest.raises(ValueError, match="already registered"):
        export_registry.register_lora_writer("mine", "native", writer)

