"""A tiny, seeded Llama for tests: real engines, real tokenizer, seconds to build.

Why trained and not random: a randomly initialised model has near-uniform
next-token distributions, where every token is a near-tie and nothing a test
checks (greedy agreement, sampling reproducibility, cheat detection) means
much. 200 seeded AdamW steps on a small built-in chat corpus give
peaked distributions like a real model's, yet the build takes about 15 s on one
core and is cached (``models.resolve_model("tiny-llama")``).

Shape: the SmolLM2 tokenizer (so prompts and chat template are the real
ones), 2 layers, hidden 64, 2 query heads of 32 sharing 1 KV head (GQA is
exercised; 32 is the smallest head size vLLM's CPU attention supports), tied
embeddings like SmolLM2 (so the tied-weight save path is tested too).

Why trained in a subprocess with pinned kernels: 200 AdamW steps amplify the
last-bit differences between CPU kernels into different models (trained with
ATen's AVX2 kernels and with its generic ones, the weights differed by up to
0.14 and the final loss was 0.260 against 0.238), and the tests' counts of
verdicts are facts about one model. A CI machine with other vector units
then trained another model and failed two tests. So the training runs in a
fresh process whose every kernel takes the machine-independent path
(:data:`REPRODUCIBLE_KERNELS`: ATen's generic x86-64 code, MKL's conditional
bitwise reproducibility, oneDNN without AVX, one thread), and
``tests/test_models.py`` pins the digest of the weights it gives.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

# Question/answer pairs the model memorises; short so training is fast.
_CORPUS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is two plus two?", "Two plus two is four."),
    ("What color is the sky?", "The sky is blue on a clear day."),
    ("Name a fruit.", "An apple is a fruit."),
    ("Say hello.", "Hello! How can I help you today?"),
    ("What do bees make?", "Bees make honey."),
    ("How many legs does a cat have?", "A cat has four legs."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("Tell me a short story.", "Once upon a time a small robot learned to sing, and the whole town listened."),
    ("What is a peer-to-peer network?", "A network where every computer talks directly to the others."),
)

_SEED = 1234
_STEPS = 200
_SEQ_LEN = 32
_BATCH = 4
_LR = 5e-3

# Every kernel the training runs takes a path that does not depend on the CPU (module docstring).
REPRODUCIBLE_KERNELS = {
    "ATEN_CPU_CAPABILITY": "default",  # ATen's generic x86-64 kernels, not AVX2/AVX-512 ones
    "MKL_CBWR": "COMPATIBLE",  # MKL's results bit-identical on every x86-64 CPU
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "OMP_NUM_THREADS": "1",  # reductions in one order whatever the machine's cores
    "MKL_NUM_THREADS": "1",
}


def tiny_config(tokenizer):
    """The architecture: small enough to train in seconds, valid for vLLM's CPU kernels."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )


def corpus_token_stream(tokenizer) -> torch.Tensor:
    """The corpus as chat transcripts, concatenated into one token stream."""
    ids: list[int] = []
    for question, answer in _CORPUS:
        chat = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        ids += tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
    return torch.tensor(ids, dtype=torch.long)


def train_tiny_model(tokenizer):
    """Seeded init + AdamW on random windows of the corpus; returns the model in eval mode."""
    from transformers import LlamaForCausalLM

    generator = torch.Generator().manual_seed(_SEED)
    torch.manual_seed(_SEED)
    model = LlamaForCausalLM(tiny_config(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    stream = corpus_token_stream(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=_LR, weight_decay=0.0)
    model.train()
    for _ in range(_STEPS):
        starts = torch.randint(0, len(stream) - _SEQ_LEN, (_BATCH,), generator=generator)
        batch = torch.stack([stream[s : s + _SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item()


def build_tiny_model(out: Path, tokenizer_dir: Path) -> None:
    """Train the tiny model in a process with :data:`REPRODUCIBLE_KERNELS` and write it as an
    HF directory into ``out`` (the kernels are chosen when torch loads, hence the process)."""
    from gonka_p2p.inference.engine import EngineError

    done = subprocess.run([sys.executable, "-m", __name__, str(out), str(tokenizer_dir)],
                          env={**os.environ, **REPRODUCIBLE_KERNELS}, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise EngineError(f"building the tiny model failed: {lines[-1]}")


def _train_and_save(out: Path, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    from gonka_p2p.inference.models import save_hf_model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model, loss = train_tiny_model(tokenizer)
    save_hf_model(model, tokenizer, out)
    (out / "TRAINING.txt").write_text(
        f"seed {_SEED}, {_STEPS} AdamW steps, batch {_BATCH}x{_SEQ_LEN}, final loss {loss:.3f}, "
        f"kernels {' '.join(f'{k}={v}' for k, v in REPRODUCIBLE_KERNELS.items())}\n"
    )


if __name__ == "__main__":
    try:
        _train_and_save(Path(sys.argv[1]), Path(sys.argv[2]))
    except Exception as error:  # one line for build_tiny_model's message, not a traceback
        sys.exit(f"{type(error).__name__}: {error}")
