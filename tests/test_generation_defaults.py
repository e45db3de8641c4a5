"""The model's own sampling defaults: read from generation_config.json (only valid sampling keys), used by the
pipeline without a gen_config and by the CLI for options left unset."""

from __future__ import annotations

import json

from lmforge.cli.common import generation_config
from lmforge.cli.main import build_parser
from lmforge.generation_defaults import EMBEDDED_DEFAULTS, load_generation_defaults, sampling_kwargs
from lmforge.weights.default_model import DEFAULT_MODEL_FILE


def test_read_from_generation_config_json(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True, "eos_token_id": 2, "min_p": 7})
    )
    assert load_generation_defaults(str(tmp_path)) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert load_generation_defaults(str(tmp_path / "missing")) == {}
    assert load_generation_defaults(f"/somewhere/{DEFAULT_MODEL_FILE}") == EMBEDDED_DEFAULTS
    assert sampling_kwargs({"temperature": 0.0}) == {"temperature": 1.0, "do_sample": False}


def test_cli_fills_unset_options_from_the_model():
    args = build_parser().parse_args(["generate", "hi", "--top-k", "5"])
    cfg = generation_config(args, {"temperature": 0.6, "top_p": 0.9, "top_k": 20})
    assert (cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k) == (True, 0.6, 0.9, 5)
    cfg = generation_config(build_parser().parse_args(["generate", "hi"]), {})
    assert not cfg.do_sample and cfg.top_p == 1.0  # no model defaults: greedy, as before


def test_pipeline_without_gen_config_uses_them(tiny_llama_dir, tmp_path):
    import shutil

    from lmforge import PytorchEngineConfig, pipeline

    model = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    with open(model / "generation_config.json") as f:
        saved = json.load(f)
    (model / "generation_config.json").write_text(json.dumps({**saved, "temperature": 0.7, "top_k": 3}))
    pipe = pipeline(str(model), PytorchEngineConfig(device_type="cpu", num_cpu_blocks=16))
    try:
        assert pipe.engine.generation_defaults == {"temperature": 0.7, "top_k": 3}
        cfg = pipe.default_gen_config(max_new_tokens=2)
        assert (cfg.do_sample, cfg.temperature, cfg.top_k, cfg.max_new_tokens) == (True, 0.7, 3, 2)
    finally:
        pipe.close()
