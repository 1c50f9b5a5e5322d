"""Corpora, the tokenizer and the packed token dataset: everything before retrieval.

    docs = corpora.load_corpus("shakespeare")            # data/corpora.py
    prepared = dataset.prepare(config)                   # data/dataset.py: tokenizer + TFDS store
"""
