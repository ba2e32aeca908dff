"""One-shot compression of a causal language model from calibration text: SparseGPT, Wanda, GPTQ.

No training after compression: each method reads a few calibration batches, block after block,
and compresses the Linear layers of that block while the blocks before it are already
compressed. To stay small and offline, a 2-layer Llama is built from a config (random weights)
and calibrated on byte tokens of the Python documentation that CPython ships (`pydoc_data`);
the score is how far each compressed model's logits move from the dense model's on other
windows of that text (perplexities of the real SmolLM2-135M are in the docs). With a real
checkpoint the calls are the same. Needs `pip install -e '.[text]'`.
Run: `python examples/llm_one_shot.py` (about 10 s).
"""

import copy
from pydoc_data.topics import topics

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import torchslim as ts
from torchslim.pruning import SparseGPT, Wanda, WeightPruning
from torchslim.quantization import GPTQ, WeightOnly

text = "\n".join(topics[key] for key in sorted(topics)).encode("utf-8", "replace")
tokens = torch.tensor(list(text), dtype=torch.long)                 # byte tokens, vocabulary 256
generator = torch.Generator().manual_seed(0)


def windows(count: int, length: int = 64) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - length, (count,), generator=generator)
    return torch.stack([tokens[s:s + length] for s in starts.tolist()])   # (count, length)


torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
dense = LlamaForCausalLM(config).eval()
held_out = windows(16)
with torch.no_grad():
    reference = dense(input_ids=held_out).logits                  # (16, 64, 256)

# --8<-- [start:one_shot]
calibration = [windows(8) for _ in range(8)]       # token batches (B, T); no labels needed
methods = {"50% magnitude": WeightPruning(sparsity=0.5),
           "50% Wanda": Wanda(sparsity=0.5, calibration_batches=8),
           "50% SparseGPT": SparseGPT(sparsity=0.5, calibration_batches=8),
           "2:4 SparseGPT": SparseGPT(pattern="2:4", calibration_batches=8),
           "int3 g32 round-to-nearest": WeightOnly(bits=3, group_size=32),
           "int3 g32 GPTQ": GPTQ(bits=3, group_size=32, calibration_batches=8)}
for name, method in methods.items():
    model = copy.deepcopy(dense)
    ts.apply_(model, method, calibration=calibration,
              targets=ts.Select(exclude=("lm_head",)))  # every Linear of the decoder blocks
    with torch.no_grad():
        logits = model(input_ids=held_out).logits
    error = float((logits - reference).norm() / reference.norm())
    print(f"{name}: relative logit error {error:.3f}")
# --8<-- [end:one_shot]
