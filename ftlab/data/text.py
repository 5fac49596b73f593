"""Plain text for causal language modelling (pretraining, or SFT on a text field).

Each row's ``text_field`` is tokenized (plus eos) and cut to ``max_length``, as TRL's
SFTTrainer does with ``dataset_text_field`` / ``max_seq_length``. Two ways to pack:

- ``packing: stream`` (or ``true``), for pretraining: the token streams are concatenated and cut
  into ``max_length`` blocks; the shorter remainder at the end is dropped (as ``transformers``'
  ``group_texts`` does), so every step trains on exactly batch x max_length tokens, the same on
  every rank. A block's tokens attend to the documents before them in the block.
- ``packing: samples``, for SFT on a text field: whole documents packed into rows of up to
  ``max_length`` tokens, positions restarting per document, so none attends to another
  (``ftlab.data.packing``); ``batch_size`` counts rows. Validation stays unpacked.
"""

from __future__ import annotations

from typing import Any, Literal

from ftlab.data import synthetic
from ftlab.data._base import TokenizedData, pad
from ftlab.data._io import Record, text
from ftlab.losses.lm import IGNORE, count_targets


class TextData(TokenizedData):
    """Causal LM data from a text column.

    Args:
        source: ``synthetic`` (ftlab's pretraining corpus), a file or folder, or an HF dataset name.
        tokenizer: Backbone whose tokenizer to use (linked from ``model.backbone.name_or_path``).
        text_field: Column holding the text.
        max_length: Tokens per sample (or per packed block).
        packing: ``stream`` (or ``true``): concatenate documents and cut the stream into full
            ``max_length`` blocks (pretraining); ``samples``: pack whole documents into rows of up to
            ``max_length`` with positions restarting per document (SFT, no attention across them).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        val_source: Separate validation file (else ``val_fraction`` of the rows).
        val_fraction: Share of rows held out for validation.
        synthetic_size: Documents in the synthetic corpus.
        max_samples: Cap on the rows per split.
        seed: Seed for the corpus, shuffling and splitting.
    """

    def __init__(
        self,
        source: str = "synthetic",
        tokenizer: str = "tiny-llama",
        text_field: str = "text",
        max_length: int = 256,
        packing: bool | Literal["stream", "samples"] = False,
        batch_size: int = 16,
        num_workers: int = 0,
        val_source: str | None = None,
        val_fraction: float = 0.02,
        synthetic_size: int = 50000,
        max_samples: int | None = None,
        seed: int = 0,
    ):
        super().__init__(
            source,
            tokenizer,
            max_length,
            batch_size,
            num_workers,
            val_source,
            val_fraction,
            max_samples,
            seed,
        )
        if packing not in (False, True, "stream", "samples"):
            raise ValueError(f"packing must be false, true, 'stream' or 'samples', got {packing!r}")
        self.text_field, self.synthetic_size = text_field, synthetic_size
        self.packing = packing in (True, "stream")  # the token stream, cut into blocks
        self.packing_samples = packing == "samples"

    def synthetic_rows(self, split: str) -> list[Record]:
        n = self.synthetic_size if split == "train" else max(1, int(self.synthetic_size * self.val_fraction))
        seed = self.seed if split == "train" else self.seed + 1_000_003
        return [
            {"text": t, "_where": f"synthetic corpus doc {i}"}
            for i, t in enumerate(synthetic.corpus_documents(n, seed))
        ]

    def encode(self, row: Record) -> dict[str, Any]:
        tok = self.tokenizer
        ids = tok(text(row, self.text_field))["input_ids"] + [tok.eos_token_id]
        if self.packing:
            return {"input_ids": ids}
        return {"input_ids": ids[: self.max_length], "truncated": len(ids) > self.max_length}

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.packing:
            for split, items in self.splits.items():
                stream = [t for it in items for t in it["input_ids"]]
                n = self.max_length
                full = [{"input_ids": stream[i : i + n]} for i in range(0, len(stream) - n + 1, n)]
                self.splits[split] = full or (
                    [{"input_ids": stream}] if stream else []
                )  # keep a lone short block

    def collate(self, items: list[dict[str, Any]], split: str) -> dict[str, Any]:
        ids = pad([it["input_ids"] for it in items], self.tokenizer.pad_token_id)
        mask = pad([[1] * len(it["input_ids"]) for it in items], 0)
        labels = ids.masked_fill(mask == 0, IGNORE)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if split == "train":
            batch["packing_efficiency"] = float(mask.float().mean())  # real / row tokens
        return batch

    def targets_in(self, batch: dict[str, Any]) -> int:
        return count_targets(batch["labels"])
