"""Adapter exports to plain models: ``dist-embed merge``."""
from __future__ import annotations

import json
from pathlib import Path


def merge_adapter_dir(adapter_dir: str | Path, out: str | Path) -> None:
    """An adapter export (``final/`` of a run with ``model.lora.export: adapter``) -> a complete
    merged sentence-transformers model in ``out``: the base model its adapter_config.json names
    with the adapters added into its weights, and the export's own modules (trained Dense layers,
    pooling, prompts), tokenizer and model card."""
    import shutil

    from peft import PeftModel
    from transformers import AutoTokenizer

    from .model import Encoder, ModelError, read_st_settings

    root = Path(adapter_dir)
    conf_file = root / "adapter_config.json"
    if not conf_file.is_file():
        raise ModelError(f"{root}: not an adapter export (no adapter_config.json)")
    try:
        base = json.loads(conf_file.read_text())["base_model_name_or_path"]
    except (ValueError, KeyError) as e:
        raise ModelError(f"{conf_file}: no base_model_name_or_path ({e})") from None
    start = Encoder.from_pretrained(base)
    st = read_st_settings(str(root))
    model = PeftModel.from_pretrained(start.transformer, str(root)).merge_and_unload()
    Encoder(model, AutoTokenizer.from_pretrained(str(root)), pooling=st.get("pooling", start.pooling),
            normalize=st.get("normalize", start.normalize), max_seq_length=st.get("max_seq_length", start.max_seq_length),
            extra_state=start.extra_state, st_config=st.get("st_config"), dense=st.get("dense", ())).save(out)
    if (root / "README.md").is_file():
        shutil.copyfile(root / "README.md", Path(out) / "README.md")
