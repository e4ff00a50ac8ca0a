"""Data pipeline: raw text -> byte-level BPE tokens -> memory-mapped shards -> training batches.

    readers    documents from txt / jsonl / parquet files or a Hugging Face dataset
    tokenizer  train, load and fingerprint the tokenizer
    prepare    split documents into train/val by hash, tokenize, write shards (also the CLI)
    shards     the on-disk format: `.bin` token files and `manifest.json`
    blocks     fixed-length blocks read from memory-mapped shards
    mixture    which source and block the n-th training sample reads
    streams    the training and validation datasets (whole batches)
The LightningDataModule that ties them together is `datamodules.TokenShardDataModule`.

Post-training data (conversations, preference pairs, prompts; `datamodules.ChatDataModule`,
`PreferenceDataModule`, `PromptDataModule`):

    chat       the chat template, tokens with an assistant mask, converting Hugging Face chat data
    records    JSON-lines records named by file and line, and their train/val split by a key
    sequences  tokenized conversations: stored flat, packed, collated into padded batches
"""
