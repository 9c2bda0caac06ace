"""Optional vLLM generation backend (``sst-merge eval --backend vllm``), for GPU users.

The prompts are exactly those of the HF backend: rendered with the model's chat template by
:func:`~sstmerge.eval.generate.render_prompt`, tokenized without extra special tokens, and passed to vLLM
as token ids; decoding is greedy (``temperature=0``) and stops at the same end-of-turn ids. The adapter is
served as a ``LoRARequest`` (vLLM's own LoRA kernels), so what is measured is what vLLM would serve.

Limits (vLLM's, checked before the engine starts by :func:`vllm_lora_settings`): the adapter may not carry
``modules_to_save`` tensors; vLLM applies one scale, ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) from
``adapter_config.json``, to every module and ignores ``rank_pattern`` / ``alpha_pattern``, so an adapter
whose modules have other scales under PEFT is refused rather than served wrongly (merged adapters written by
sstmerge have one rank and scale 1); its rank must fit ``max_lora_rank`` (the smallest vLLM-supported value
≥ the adapter's largest rank is chosen). Log-likelihood scoring (the ``mcq`` suite) and model-based judges
still use the HF model.

This module is exercised only where vLLM is installed (a CUDA machine); it has not been run on the CPU-only
machines sstmerge is developed on. Without vLLM, asking for it is a clear :class:`ConfigError`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from .._logging import quiet
from ..errors import ConfigError, UnsupportedAdapterError
from .generate import MAX_PROMPT_TOKENS, render_prompt

log = logging.getLogger(__name__)

#: ranks vLLM's LoRA kernels accept for ``max_lora_rank`` (vllm.config.LoRAConfig)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest vLLM-supported ``max_lora_rank`` ≥ ``rank``; :class:`UnsupportedAdapterError` above 512."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise UnsupportedAdapterError(
        f"adapter rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}; "
        "recompress it (sst-merge merge --recompress-rank R) or evaluate with --backend hf"
    )


def vllm_lora_settings(adapter) -> dict:
    """``LLM(...)`` keyword arguments that serve ``adapter`` as a LoRA, after checking that vLLM would apply
    it as PEFT does; :class:`UnsupportedAdapterError` otherwise (``modules_to_save`` tensors, per-module
    scales from ``rank_pattern`` / ``alpha_pattern`` that differ from the config's one scale, rank > 512)."""
    if adapter.full_shapes:
        raise UnsupportedAdapterError(
            f"{adapter.name}: vLLM does not load adapters with modules_to_save tensors "
            f"({sorted(adapter.full_shapes)}); evaluate with --backend hf"
        )
    specs = adapter.specs
    cfg = adapter.config
    r, alpha = float(cfg["r"]), float(cfg["lora_alpha"])
    vllm_scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r  # vLLM's PEFTHelper, all modules
    off = {m: s.scale for m, s in specs.items() if not math.isclose(s.scale, vllm_scale, rel_tol=1e-6)}
    if off:
        module, scale = sorted(off.items())[0]
        raise UnsupportedAdapterError(
            f"{adapter.name}: vLLM applies one LoRA scale to every module ({vllm_scale:g} from r and lora_alpha in "
            f"adapter_config.json; it ignores rank_pattern and alpha_pattern), but under PEFT {len(off)} module(s) "
            f"have another scale, e.g. {module!r}: {scale:g}; evaluate with --backend hf"
        )
    rank = max([s.rank for s in specs.values()] + [int(r)])
    return {"enable_lora": True, "max_loras": 1, "max_lora_rank": vllm_max_lora_rank(rank)}


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "--backend vllm needs the vllm package (pip install vllm, on a machine with a CUDA GPU); "
            "use --backend hf (the default) otherwise"
        )


class VLLMGenerator:
    """Greedy chat completions through a vLLM engine, with the adapter (if any) as a LoRA request."""

    def __init__(self, base_path: str | Path, tokenizer, adapter=None, *, eos_ids: Sequence[int] = (),
                 gpu_memory_utilization: float = 0.8) -> None:
        require_vllm()
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        kwargs = {}
        self.lora_request = None
        if adapter is not None:
            kwargs = vllm_lora_settings(adapter)
            self.lora_request = LoRARequest("sstmerge-adapter", 1, str(adapter.path))
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        log.info("starting vLLM on %s %s", base_path, kwargs)
        self.llm = LLM(model=str(base_path), tokenizer=str(base_path), seed=0,
                       gpu_memory_utilization=gpu_memory_utilization, **kwargs)

    def __call__(self, prompts: Sequence, max_new_tokens: int, desc: str = "generate") -> list[str]:
        from vllm import SamplingParams

        ids = [self.tokenizer(render_prompt(self.tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
        ids = [x[-MAX_PROMPT_TOKENS:] for x in ids]  # long prompts keep their end, as in the HF backend
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=self.eos_ids,
                                skip_special_tokens=True)
        outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, lora_request=self.lora_request,
                                 use_tqdm=not quiet())
        return [o.outputs[0].text.strip() for o in outs]
