"""AutoModelConfigBuilder: HF config -> ModelConfig.

Every subclass registers itself on definition. `AutoModelConfigBuilder.build(hf_config)` on the
base class asks each registered builder's `condition` and uses the first that holds: builders defined
outside lmforge (a user's, e.g. in a custom_module_map file) first, the newest first, then lmforge's
own in registration order, the default builder last. Defining a class again under the same module
and name replaces the earlier one.
"""

from __future__ import annotations

from typing import ClassVar

from lmforge.config import ModelConfig


class AutoModelConfigBuilder:
    _registry: ClassVar[list[type[AutoModelConfigBuilder]]] = []
    is_default: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        registry = AutoModelConfigBuilder._registry
        registry[:] = [b for b in registry if (b.__module__, b.__qualname__) != (cls.__module__, cls.__qualname__)]
        registry.append(cls)

    @classmethod
    def condition(cls, hf_config) -> bool:
        """Whether this builder understands `hf_config`."""
        raise NotImplementedError

    @classmethod
    def build(cls, hf_config, model_path: str | None = None, **kwargs) -> ModelConfig:
        if cls is not AutoModelConfigBuilder:
            raise NotImplementedError(f"{cls.__name__} must implement build()")
        builder = cls.find_builder(hf_config)
        config = builder.build(hf_config, model_path, **kwargs)
        if config.hf_config is None:
            config.hf_config = hf_config
        if config.model_arch is None:
            archs = getattr(hf_config, "architectures", None) or []
            config.model_arch = archs[0] if archs else None
        return config

    @classmethod
    def find_builder(cls, hf_config) -> type[AutoModelConfigBuilder]:
        builtin = [b for b in cls._registry if b.__module__.startswith("lmforge.")]
        custom = [b for b in reversed(cls._registry) if not b.__module__.startswith("lmforge.")]
        ordered = custom + [b for b in builtin if not b.is_default] + [b for b in builtin if b.is_default]
        for builder in ordered:
            if builder.condition(hf_config):
                return builder
        raise ValueError(f"no config builder accepts model_type {getattr(hf_config, 'model_type', None)!r}")
