"""A tiny Llama-3.1-architecture model directory around Meta's real Llama-3 tokenizer, for tests.

The tokenizer is Meta's tiktoken file shipped in the ``llama-models`` package (128,000 BPE ranks
plus 256 special tokens), converted with transformers' ``TikTokenConverter`` and written the way
the hub's Llama-3.1 repositories write it: ``tokenizer.json`` with a BOS-adding post-processor,
``tokenizer_config.json`` (``PreTrainedTokenizerFast``, the Llama-3 instruct chat template),
``config.json`` with ``rope_scaling`` of type ``llama3``, and the base model's
``generation_config.json`` (EOS ``<|end_of_text|>`` only, as Meta-Llama-3.1-8B ships it).
Only the width is tiny (hidden 64, 2 layers); the vocabulary is the real 128,256.

The directory is built once (~20 s) and cached under ``~/.cache/allora_ds`` (or
``$ALLORA_DS_TEST_CACHE``), keyed by a hash of this file and the library versions that shape it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

BOS, EOS, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
BOS_ID, EOS_ID, EOT_ID, PAD_ID = 128000, 128001, 128009, 128004
# Meta's order (llama_models/llama3/tokenizer.py): these 12, then reserved tokens up to 256.
SPECIAL = [BOS, EOS, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>", PAD, "<|step_id|>",
           "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", EOT, "<|python_tag|>", "<|image|>"]
SPECIAL += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(SPECIAL))]
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Meta-Llama-3-8B-Instruct's chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def tokenizer_model_file() -> Path | None:
    """Meta's ``tokenizer.model`` from the installed ``llama-models`` package, or None."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "llama3" / "tokenizer.model"
    return path if path.is_file() else None


def missing_requirement() -> str | None:
    """Why the fixture cannot be built here (None when it can)."""
    if tokenizer_model_file() is None:
        return "llama-models is not installed (pip install llama-models): it ships Meta's Llama-3 tokenizer"
    if importlib.util.find_spec("tiktoken") is None:
        return "tiktoken is not installed (pip install tiktoken): transformers needs it to read Meta's tokenizer"
    return None


def _write_tokenizer(out: Path) -> None:
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(tokenizer_model_file()), pattern=PATTERN,
                            extra_special_tokens=SPECIAL).converted()
    # As in the hub's tokenizer.json: encoding a text starts it with <|begin_of_text|>.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, BOS_ID)]),
    ])
    tok.save(str(out / "tokenizer.json"))
    added = {str(BOS_ID + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": True} for i, t in enumerate(SPECIAL)}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": added, "bos_token": BOS, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True, "eos_token": EOS, "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}, indent=2))


def _write_model(out: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    # Meta-Llama-3.1-8B's config.json with the widths shrunk (the hub's keys: rope_scaling, rope_theta).
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": 0.02, "intermediate_size": int(3.5 * hidden), "max_position_embeddings": 131072,
        "mlp_bias": False, "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": layers,
        "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
        "vocab_size": 128256}, indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": True, "temperature": 0.6, "top_p": 0.9},
        indent=2))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32)
    # safetensors directly, so config.json stays in the hub's format rather than transformers' own.
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


def cache_key() -> str:
    import tokenizers
    import transformers

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(tokenizer_model_file().read_bytes())
    h.update(f"{transformers.__version__} {tokenizers.__version__}".encode())
    return h.hexdigest()[:16]


def llama3_model_dir(cache: Path | None = None) -> Path:
    """The cached model directory, built first if needed (atomically, so a killed build leaves none)."""
    root = Path(cache or os.environ.get("ALLORA_DS_TEST_CACHE") or Path.home() / ".cache" / "allora_ds")
    out = root / f"llama3.1-tiny-{cache_key()}"
    if (out / "model.safetensors").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        _write_tokenizer(tmp)
        _write_model(tmp)
        os.replace(tmp, out)
    except OSError:
        if not (out / "model.safetensors").is_file():  # not a parallel build that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
