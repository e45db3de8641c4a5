"""ConfigBuilders registered from outside lmforge through a custom_module_map file (defined in the file itself, or
in a module its CONFIG_BUILDERS names) are in effect before the first ModelConfig is built: in check_model, which
reports the builder, and in the first pipeline of the process. A request that fails inside the engine raises in the
pipeline with the engine's cause."""

from __future__ import annotations

import textwrap

import pytest

from lmforge.check_env import check_model
from lmforge.check_env.parity import build_tiny_model, save_tiny_model, tiny_hf_config
from lmforge.messages import GenerationConfig, PytorchEngineConfig
from lmforge.pipeline import GenerationError, pipeline

# only configs carrying `acme_context` match, so the builders left registered affect no other test
BUILDER = """
from lmforge.configurations import AutoModelConfigBuilder
from lmforge.configurations.default import DefaultModelConfigBuilder


class {name}(AutoModelConfigBuilder):
    @classmethod
    def condition(cls, hf_config) -> bool:
        return getattr(hf_config, "acme_context", None) is not None

    @classmethod
    def build(cls, hf_config, model_path=None, **kwargs):
        config = DefaultModelConfigBuilder.build(hf_config, model_path)
        config.max_position_embeddings = hf_config.acme_context  # the field this family names its own way
        return config
"""


def _model(tmp_path, **config) -> str:
    path = str(tmp_path / "model")
    save_tiny_model(build_tiny_model(tiny_hf_config("qwen2", **config)), path)
    return path


def _engine_config(map_file) -> PytorchEngineConfig:
    return PytorchEngineConfig(device_type="cpu", dtype="float32", num_cpu_blocks=64, custom_module_map=str(map_file))


@pytest.mark.parametrize("where", ["map_file", "config_builders_module"])
def test_custom_builder_is_used_by_check_model_and_the_first_pipeline(tmp_path, where):
    name = f"Acme{where.title().replace('_', '')}Builder"
    folder = tmp_path / "plugins"
    folder.mkdir()
    map_file = folder / "module_map.py"
    if where == "map_file":
        map_file.write_text(textwrap.dedent(BUILDER.format(name=name)) + "\nMODULE_MAP = {}\n")
    else:
        (folder / f"acme_builders_{where}.py").write_text(textwrap.dedent(BUILDER.format(name=name)))
        map_file.write_text(f"MODULE_MAP = {{}}\nCONFIG_BUILDERS = ['acme_builders_{where}']\n")
    model = _model(tmp_path, acme_context=40)
    report = check_model(model, custom_module_map=str(map_file), verbose=False)
    assert report.builder.startswith(f"{name} (from ") and report.model_config.max_position_embeddings == 40
    with pipeline(model, _engine_config(map_file)) as pipe:  # the engine's own ModelConfig, built once
        assert pipe.engine.session_len == 40
        assert len(pipe([5, 6, 7], GenerationConfig(max_new_tokens=3, ignore_eos=True)).token_ids) == 3


def test_config_builders_must_be_builders(tmp_path):
    map_file = tmp_path / "module_map.py"
    map_file.write_text("MODULE_MAP = {}\nCONFIG_BUILDERS = ['collections.OrderedDict']\n")
    with pytest.raises(Exception, match="not AutoModelConfigBuilder subclasses"):
        check_model(_model(tmp_path), custom_module_map=str(map_file), verbose=False)


def test_a_request_failing_in_the_engine_raises_in_the_pipeline_with_the_cause(tmp_path):
    (tmp_path / "failing_qwen2.py").write_text(
        textwrap.dedent(
            """
            from lmforge.models.qwen2 import Qwen2ForCausalLM

            class FailingQwen2(Qwen2ForCausalLM):
                def forward(self, *args, **kwargs):
                    raise RuntimeError("the model's own failure")
            """
        )
    )
    map_file = tmp_path / "module_map.py"
    map_file.write_text("MODULE_MAP = {'Qwen2ForCausalLM': 'failing_qwen2.FailingQwen2'}\n")
    with pipeline(_model(tmp_path), _engine_config(map_file)) as pipe:
        with pytest.raises(GenerationError, match="prompt 0 .*RuntimeError: the model's own failure"):
            pipe([[5, 6, 7], [8, 9]], GenerationConfig(max_new_tokens=3))
        assert not pipe.engine.has_unfinished()  # the other request was aborted
