"""The causal LM loss on labelled positions only, without logits for the rest of the sequence.

Hugging Face computes logits for every position (64K tokens x 152064 vocab in bf16 is 20 GB,
then an fp32 copy in the loss) although only the answer tokens carry labels. Here the root
model is still called as a whole (so FSDP2's root pre-forward unshards the embeddings, final norm
and lm_head as usual) with ``logits_to_keep`` = the positions whose *next* token is labelled in
some sample of the batch (a 1-D index tensor: transformers 5.x slices ``hidden_states[:, idx]``
before ``lm_head``), and the cross-entropy runs on those logits only. The value equals
``model(**batch, labels=labels).loss``: mean over labelled targets of -log p(target), logits in
fp32.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """1-D positions p (ascending) with ``labels[b, p + 1] != -100`` for some sample b."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().flatten()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` [B, K, V] (rows = ``positions``) against ``labels[:, positions + 1]``."""
    targets = labels[:, positions + 1]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def model_loss(model, batch: dict) -> torch.Tensor:
    """Forward of the whole model with logits only where a label follows; the mean LM loss."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    positions = predicting_positions(batch["labels"])
    out = model(**inputs, use_cache=False, logits_to_keep=positions)  # a KV cache would break AC recomputation
    return causal_lm_loss(out.logits, batch["labels"], positions)
