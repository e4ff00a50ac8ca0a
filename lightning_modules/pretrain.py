"""Pretraining: next-token cross-entropy; validation loss and bits-per-byte per data source."""

import math

import torch

from datamodules.chat import ChatDataModule
from lightning_modules.base import LMModule
from slmlab.data.bags import BagSchedule, bag_row_len
from slmlab.training.batching import document_positions


def loss_and_bpb(sums: dict[str, tuple[float, float]], bytes_per_token, prefix: str = "val") -> dict[str, float]:
    """Per source and overall: loss = nats per token; bits-per-byte = nats / ln 2 / bytes, where each
    source's bytes are its evaluated tokens times the bytes-per-token measured on its validation text."""
    metrics, total_nats, total_tokens, total_bytes = {}, 0.0, 0.0, 0.0
    for name, (nats, tokens) in sums.items():
        n_bytes = tokens * bytes_per_token(name)
        metrics[f"{prefix}/{name}/loss"] = nats / tokens
        metrics[f"{prefix}/{name}/bpb"] = nats / math.log(2) / n_bytes
        total_nats, total_tokens, total_bytes = total_nats + nats, total_tokens + tokens, total_bytes + n_bytes
    if total_tokens:
        metrics[f"{prefix}/loss"] = total_nats / total_tokens
        metrics[f"{prefix}/bpb"] = total_nats / math.log(2) / total_bytes
    return metrics


def bag_positions(seq_len: int, bag: int) -> int:
    """Positions the model reads from a batch of seq_len tokens (and one more, the last label) in bags."""
    return (seq_len + 1) // bag - 1


def superposed(input_ids: torch.Tensor, labels: torch.Tensor, bag: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A next-token batch (input_ids, labels shifted by one), (batch, seq), as bags of `bag` consecutive
    tokens: inputs (batch, n, bag) and, for each, the next bag as its targets, taken from the labels (a
    masked label stays masked); n = bag_positions(seq, bag), a tail shorter than a bag is dropped."""
    n, rows = bag_positions(input_ids.size(1), bag), input_ids.size(0)
    return (input_ids[:, :n * bag].reshape(rows, n, bag),
            labels[:, bag - 1:(n + 1) * bag - 1].reshape(rows, n, bag))


def check_superposition(phases: list) -> list[tuple[int, float]]:
    """`stage.superposition` as [(bag, until), ...]; ValueError naming the setting unless bags shrink
    (each > 1) while the `until` fractions of the run grow within (0, 1]."""
    try:
        parsed = [(int(bag), float(until)) for bag, until in phases]
    except (TypeError, ValueError):
        raise ValueError(f"stage.superposition={phases!r}: expected a list of [bag, until] pairs, e.g. "
                         "[[4, 0.2], [2, 0.3]]") from None
    bags, untils = [b for b, _ in parsed], [u for _, u in parsed]
    if any(b <= 1 for b in bags) or bags != sorted(set(bags), reverse=True):
        raise ValueError(f"stage.superposition={phases!r}: bags must be > 1 and shrink from phase to phase")
    if untils != sorted(set(untils)) or not all(0 < u <= 1 for u in untils):
        raise ValueError(f"stage.superposition={phases!r}: each phase's `until` (a fraction of trainer.max_steps) "
                         "must lie in (0, 1] and grow from phase to phase")
    return parsed


class PretrainModule(LMModule):
    """`superposition`: token superposition training, a list of [bag, until] phases, e.g. [[4, 0.2], [2, 0.3]]:
    up to 20% of trainer.max_steps the model reads each bag of 4 consecutive tokens as one position (the
    mean of their embeddings) and predicts the next bag (multi-hot cross-entropy), then bags of 2 up to
    30%, then ordinary next-token training. As published, a step of bag s keeps the positions (and about
    the compute) of a next-token step and reads s times the tokens: the data module reads each row as
    s * (seq_len + 1) tokens (`slmlab/data/bags.py`). Validation stays next-token.

    `document_mask`: each document of the stream (they end with the tokenizer's EOS) is modelled alone,
    training and validation: a row's documents do not see each other (`CausalLM.hidden`'s positions)."""

    def __init__(self, *args, z_loss: float = 0.0, superposition: list | None = None, document_mask: bool = False,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.z_loss, self.document_mask = z_loss, document_mask
        self.superposition = check_superposition(superposition or [])
        if document_mask and self.superposition:
            raise ValueError("stage.document_mask with stage.superposition: bags of tokens cross document ends")
        self.bag_schedule: BagSchedule | None = None

    def setup(self, stage: str) -> None:
        if self.document_mask and isinstance(self.trainer.datamodule, ChatDataModule):
            # positions would restart after the question: the reply would not see it
            raise ValueError("stage.document_mask splits rows at each end-of-document token, and every turn of "
                             "a conversation ends with one (<|im_end|>): leave it off for chat data "
                             "(data.packing=true keeps packed conversations apart)")
        super().setup(stage)
        if self.superposition and stage == "fit":
            data = self.trainer.datamodule
            if not hasattr(data, "read_bags"):
                raise ValueError(f"stage.superposition: the data module {type(data).__name__} cannot read bags of "
                                 "tokens; token superposition training needs token shards (data=...)")
            self.bag_schedule = BagSchedule.from_steps(self.superposition, self.total_steps(), self.samples_per_step())
            data.read_bags(self.bag_schedule)

    def samples_per_step(self) -> int:
        """Training samples per optimizer step on all ranks."""
        return self.trainer.datamodule.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def bag_size(self) -> int:
        """Tokens per position at this optimizer step (1 outside token superposition training)."""
        if self.bag_schedule is None:
            return 1
        return self.bag_schedule.bag(self.trainer.global_step * self.samples_per_step())

    def flops_per_data_token(self, seq_len: int, batch: dict) -> float | torch.Tensor:
        bag = self.bag_size()
        return self.model.flops_per_token(bag_positions(seq_len, bag), bag, self.batch_positions(batch))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        input_ids, labels = batch["input_ids"], batch["labels"]
        if self.superposition:
            bag = self.bag_size()
            if bag > 1:
                expected = bag_row_len(self.trainer.datamodule.seq_len, bag) - 1
                if input_ids.size(1) != expected:  # the stream's phase is not this step's
                    raise RuntimeError(
                        f"step {self.trainer.global_step} reads bags of {bag} tokens, but its batch holds "
                        f"{input_ids.size(1)} tokens per row, not {expected}: the data stream's superposition "
                        "phases follow the sample position, and a resumed run must keep data.batch_size, the "
                        "number of devices and trainer.accumulate_grad_batches")
                input_ids, labels = superposed(input_ids, labels, bag)
            self.log("train/bag_size", torch.tensor(float(bag)))  # on the CPU, as `train/lr` (see `LMModule`)
        # no whole-batch logits
        # None under superposition (stage.document_mask refuses it; its bag rows carry no positions)
        loss, ce = self.model.loss(input_ids, labels, self.z_loss, positions=self.batch_positions(batch))
        self.log_train_means({"train/loss": ce}, labels)
        return loss

    def positions(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Each token's position in its document with `document_mask`, else None (the row as one sequence)."""
        if not self.document_mask:
            return None
        eos_id = self.trainer.datamodule.eos_id
        if eos_id is None:
            raise ValueError(f"stage.document_mask: the data module {type(self.trainer.datamodule).__name__} "
                             "names no end-of-document token (eos_id)")
        return document_positions(input_ids, eos_id)

    def batch_positions(self, batch: dict) -> torch.Tensor | None:
        """The batch's own positions (packed chat data, which distillation may train on), else `positions`."""
        positions = batch.get("positions")
        return positions if positions is not None else self.positions(batch["input_ids"])

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.accumulate_val_loss(batch | {"positions": self.batch_positions(batch)}, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self.log_metrics(loss_and_bpb(self.val_loss_sums(), self.trainer.datamodule.bytes_per_token))
