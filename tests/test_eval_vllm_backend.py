"""The vLLM backend's adapter checks (run without vLLM: they happen before the engine starts).

vLLM serves a LoRA with one scale, lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), read from
adapter_config.json for every module (vllm/lora/peft_helper.py, lora_weights.py); rank_pattern and
alpha_pattern are ignored. Adapters it would apply differently from PEFT are refused.
"""

from __future__ import annotations

import pytest

from sstmerge.errors import UnsupportedAdapterError
from sstmerge.eval.vllm_backend import vllm_lora_settings
from sstmerge.io.adapter import read_adapter


def test_plain_and_rslora_adapters_are_served(adapter_factory):
    plain = read_adapter(adapter_factory(r=4, alpha=8))
    assert vllm_lora_settings(plain) == {"enable_lora": True, "max_loras": 1, "max_lora_rank": 8}
    rs = read_adapter(adapter_factory(r=16, alpha=8, use_rslora=True))
    assert vllm_lora_settings(rs)["max_lora_rank"] == 16
    # per-module ranks whose alphas keep every scale equal to the config's: vLLM applies them as PEFT does
    same_scale = read_adapter(adapter_factory(r=4, alpha=8, rank_pattern={"v_proj": 24}, alpha_pattern={"v_proj": 48}))
    assert vllm_lora_settings(same_scale)["max_lora_rank"] == 32


@pytest.mark.parametrize("kwargs", [{"alpha_pattern": {"q_proj": 32}}, {"rank_pattern": {"v_proj": 8}}])
def test_per_module_scales_are_refused(adapter_factory, kwargs):
    adapter = read_adapter(adapter_factory(r=4, alpha=8, **kwargs))
    refused = r"one LoRA scale.*ignores rank_pattern and alpha_pattern.*--backend hf"
    with pytest.raises(UnsupportedAdapterError, match=refused):
        vllm_lora_settings(adapter)


def test_modules_to_save_is_refused(adapter_factory):
    adapter = read_adapter(adapter_factory(modules_to_save=["lm_head"]))
    with pytest.raises(UnsupportedAdapterError, match="modules_to_save.*--backend hf"):
        vllm_lora_settings(adapter)
