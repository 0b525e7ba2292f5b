"""Hugging Face interoperability: name/config mapping (``mapping.py``), writing and reading HF model directories
(``hf_dir.py``) and the modeling code shipped inside exported MoNE / M-MoE directories
(``configuration_moetron.py``, ``modeling_moetron.py``; loaded with ``trust_remote_code=True``; they import only
torch and transformers, never moetron). The entry point is ``launcher/hf/convert.py``; the format is in docs/convert.md.
"""
