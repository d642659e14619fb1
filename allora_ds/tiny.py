"""A tiny Llama-3-architecture model and tokenizer, built offline, in Hugging Face format.

    python -m allora_ds.tiny OUTDIR [--hidden 64 --layers 2 --vocab 512 --seed 0]

The model has Llama-3's shape features (GQA, SiLU-gated MLP, RMSNorm, rope_theta 500000,
untied embeddings, Llama-3 special tokens and chat template) at toy size, briefly pretrained
on the shipped corpus (a few seconds on a CPU) so that finetuning it is meaningful.
The tokenizer is a sentencepiece BPE (byte fallback) trained on the shipped synthetic corpus
and the demo instructions, converted by transformers, so it loads with ``AutoTokenizer`` like any hub tokenizer.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import torch

from allora_ds import log
from allora_ds.data import ALPACA_PROMPT, ALPACA_PROMPT_INPUT
from allora_ds.demo_data import ASSETS, instructions

# Llama-3's special tokens; ids 1/2 are bos/eos as sentencepiece's bos/eos pieces.
BOS, EOS, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|pad|>"
HEADER_TOKENS = ["<|start_header_id|>", "<|end_header_id|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def tokenizer_training_text() -> list[str]:
    """The shipped corpus plus the demo's instructions in the Alpaca template, one line each."""
    lines = (ASSETS / "corpus.txt").read_text(encoding="utf-8").splitlines()
    for row in instructions(480, seed=1):
        prompt = (ALPACA_PROMPT_INPUT if row["input"] else ALPACA_PROMPT).format(**row)
        lines += [ln for ln in (prompt + row["output"]).splitlines() if ln]
    return lines


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512):
    """Train a sentencepiece BPE on the demo text and save it as a transformers tokenizer."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    lines = tokenizer_training_text()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        bos_piece=BOS, eos_piece=EOS, user_defined_symbols=HEADER_TOKENS + [EOT, PAD],
        num_threads=1, minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "tokenizer.model").write_bytes(model.getvalue())
        Path(tmp, "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
        tok = AutoTokenizer.from_pretrained(tmp, bos_token=BOS, eos_token=EOS, add_bos_token=True)
    tok.pad_token = PAD
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok


def tiny_llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      intermediate: int | None = None, max_positions: int = 1024, **overrides):
    """A Llama-3-architecture ``LlamaConfig`` at toy size (GQA, rope_theta 500000, untied)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or int(3.5 * hidden),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-5, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, **overrides,
    )


def pretrain(model, tokenizer, steps: int, seq_len: int = 64, batch: int = 16, lr: float = 3e-3, seed: int = 0):
    """Full-parameter language modelling on the shipped corpus (random windows, AdamW, cosine).

    Gives the demo a base model that knows the corpus' words, so a finetune starts from
    something and its loss falls visibly. Returns the loss of the last 10 steps.
    """
    text = (ASSETS / "corpus.txt").read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text.replace("\n", " ")).input_ids)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    tail = []
    for _ in range(steps):
        start = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=g)
        x = torch.stack([ids[s : s + seq_len] for s in start.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tail = (tail + [loss.item()])[-10:]
    model.eval()
    return sum(tail) / max(len(tail), 1)


def build_tiny(out_dir: str | Path, hidden: int = 64, layers: int = 2, vocab_size: int = 512, seed: int = 0,
               pretrain_steps: int = 300, max_shard_size: str | int = "5GB") -> Path:
    """Write config, weights (safetensors), generation config and tokenizer to ``out_dir``.

    ``pretrain_steps=0`` keeps the random initialisation (enough for tests of mechanics).
    """
    from transformers import GenerationConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = build_tokenizer(out, vocab_size=vocab_size)
    config = tiny_llama_config(len(tok), hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    note = "random weights"
    if pretrain_steps:
        loss = pretrain(model, tok, pretrain_steps, seed=seed)
        note = f"pretrained {pretrain_steps} steps on the corpus, final loss {loss:.3f}"
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids(EOT)],
        pad_token_id=tok.pad_token_id, do_sample=False, max_new_tokens=32,
    )
    model.save_pretrained(out, max_shard_size=max_shard_size)
    n = sum(p.numel() for p in model.parameters())
    log.info(f"tiny Llama-3-architecture model ({n:,} parameters, {note}) and tokenizer written to {out}", every_rank=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=300, help="0 = random weights")
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 200KB to write several safetensors shards")
    a = p.parse_args(argv)
    build_tiny(a.out_dir, hidden=a.hidden, layers=a.layers, vocab_size=a.vocab, seed=a.seed,
               pretrain_steps=a.pretrain_steps, max_shard_size=a.max_shard_size)


if __name__ == "__main__":
    main()
