"""Data: preprocess raw text into webdataset shards and read them back as train/valid batches.

Writing: ``preprocess.py`` (the command) <- ``inputs.py``, ``tokenizer.py``, ``writer.py``. Reading: ``build.py``
(``build_loader``) <- ``loader.py`` (resumable iterators) <- ``mixture.py``, ``reader.py``, ``synthetic.py``. Both
sides share ``format.py`` (the shard format) and never import each other.
"""
