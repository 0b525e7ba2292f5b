"""Hugging Face interoperability. ``convert.py`` is the entry point; ``families/`` holds one small declarative
mapping per Hugging Face ``model_type`` (config keys, options, names) applied by the one engine in ``family.py``;
``transfer.py`` moves tensors between a moetron model and a directory through ``safetensors_io.py`` (the validating,
streaming reader/writer); ``hf_dir.py`` handles the tokenizer and other non-weight files; ``configuration_moetron.py``
and ``modeling_moetron.py`` are the modeling code shipped inside exported MoNE / M-MoE directories (loaded with
``trust_remote_code=True``; they import only torch and transformers, never moetron). docs/convert.md has the format.
"""
