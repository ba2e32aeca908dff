"""Prune a Hugging Face BERT classifier: attention heads and MLP neurons, then distil and reload.

`transformers` models are taken as they are. Here a small BERT is built from a config so the
example downloads nothing; with your own fine-tuned model use
`AutoModelForSequenceClassification.from_pretrained("./my-finetuned-bert")` (a local folder).
The task is synthetic: is the first token below 50? Needs `pip install -e '.[text]'`.
Run: `python examples/prune_huggingface_bert.py` (about 10 s).
"""

import copy
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

import torchslim as ts
from torchslim.distillation import DistillationLoss
from torchslim.pruning import ChannelPruning
from torchslim.training import Trainer, make_train_config

out = Path("runs/examples/prune_huggingface_bert")  # relative to the current folder
generator = torch.Generator().manual_seed(0)


def batches(count: int) -> list[dict[str, torch.Tensor]]:
    """Hugging Face style batches: keyword inputs and `labels` in one dict."""
    result = []
    for _ in range(count):
        ids = torch.randint(1, 100, (32, 16), generator=generator)   # (B, T)
        result.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                       "labels": (ids[:, 0] < 50).long()})
    return result


torch.manual_seed(0)
config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, max_position_embeddings=32, num_labels=2)
model = BertForSequenceClassification(config)
train, test = batches(40), batches(8)
Trainer(model, train, progress=False, config=make_train_config(epochs=3, optimizer="adamw", lr=1e-3)).fit()
teacher = copy.deepcopy(model).eval()

# --8<-- [start:prune]
example = {key: value[:2] for key, value in test[0].items() if key != "labels"}
changes = ts.apply_(model, ChannelPruning(ratio=0.5), example_inputs=example)   # half the heads and neurons
print(f"heads per layer: {teacher.config.num_attention_heads} -> {model.config.num_attention_heads}")
Trainer(model, train, progress=False, loss=DistillationLoss(teacher, temperature=4.0, alpha=0.5),
        config=make_train_config(epochs=2, optimizer="adamw", lr=5e-4)).fit()
path = ts.save(model, out / "bert-pruned.slim", example_inputs=example)
reloaded = ts.load(path)                          # rebuilt from its recorded config: no model argument
# --8<-- [end:prune]


def accuracy(m: torch.nn.Module) -> float:
    return ts.measure.evaluate(m, test)["accuracy"]


with torch.no_grad():
    assert torch.equal(reloaded(**example).logits, model.eval()(**example).logits)
params = [sum(p.numel() for p in m.parameters()) for m in (teacher, model)]
print(f"params {params[0]:,} -> {params[1]:,}; "
      f"test accuracy {accuracy(teacher):.1%} -> {accuracy(reloaded):.1%}")
