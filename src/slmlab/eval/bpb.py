"""Validation loss and bits-per-byte of a model, per data source and overall."""

import math

import torch
import torch.nn.functional as F

from datamodules import TokenShardDataModule
from slmlab.models import CausalLM
from slmlab.training.batching import document_positions
from slmlab.training.losses import IGNORE_INDEX


@torch.no_grad()
def bits_per_byte(model: CausalLM, datamodule: TokenShardDataModule,
                  document_mask: bool = False) -> dict[str, dict[str, float]]:
    """{source: {"loss", "bpb", "nats", "tokens", "bytes"}, ..., "overall": {...}} over every block of
    each source's validation split (the datamodule is set up here if it is not yet). With
    `document_mask` each document of a block is modelled alone, as a model trained with
    `stage.document_mask=true` was validated; else the block is one sequence.

    loss = nats / tokens; bpb = nats / ln 2 / bytes, where a source's bytes are its evaluated tokens
    times the UTF-8 bytes per token measured on its validation text (`bytes_per_token`); overall
    sums nats and bytes over sources, so each byte of text weighs the same.
    """
    datamodule.prepare_data()
    datamodule.setup("validate")
    device = model.lm_head.weight.device
    results, total = {}, {"nats": 0.0, "tokens": 0, "bytes": 0.0}
    for name, loader in zip(datamodule.val_sources, datamodule.val_dataloader()):
        nats, tokens = 0.0, 0
        for batch in loader:
            input_ids = batch["input_ids"].to(device)
            positions = document_positions(input_ids, datamodule.eos_id) if document_mask else None
            logits = model(input_ids, positions=positions)
            labels = batch["labels"].to(device)
            nats += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                    reduction="sum").item()
            tokens += int((labels != IGNORE_INDEX).sum())
        sums = {"nats": nats, "tokens": tokens, "bytes": tokens * datamodule.bytes_per_token(name)}
        results[name] = _rates(sums)
        total = {key: total[key] + sums[key] for key in total}
    results["overall"] = _rates(total)
    return results


def _rates(sums: dict) -> dict[str, float]:
    return {"loss": sums["nats"] / sums["tokens"], "bpb": sums["nats"] / math.log(2) / sums["bytes"], **sums}
