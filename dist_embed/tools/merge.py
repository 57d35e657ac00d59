"""Adapter exports to plain models: ``dist-embed merge``."""
from __future__ import annotations

import json
from pathlib import Path


def merge_adapter_dir(adapter_dir: str | Path, out: str | Path, overwrite: bool = False) -> None:
    """An adapter export (``final/`` of a run with ``model.lora.export: adapter``) -> a complete
    merged sentence-transformers model in ``out``: the base model its adapter_config.json names
    with the adapters added into its weights, and the export's own modules (trained Dense layers,
    pooling, prompts), tokenizer and model card.

    Everything is checked before anything is written, and ``out`` appears whole or not at all
    (written beside it, then renamed): never into the export itself, never over an existing
    directory unless ``overwrite``."""
    import shutil

    from ..model.encoder import Encoder, ModelError, read_st_settings
    from ..model.st_modules import safetensors_problem

    root, dest = Path(adapter_dir), Path(out)
    conf_file = root / "adapter_config.json"
    if not conf_file.is_file():
        raise ModelError(f"{root}: not an adapter export (no adapter_config.json)")
    a, b = root.resolve(), dest.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise ModelError(f"{out}: the merged model needs a directory of its own, not the adapter export {adapter_dir} "
                         "or one around or inside it")
    if dest.exists() and not overwrite and (not dest.is_dir() or any(dest.iterdir())):
        raise ModelError(f"{out}: already exists; choose a new directory, or pass --overwrite to replace it")
    try:
        base = json.loads(conf_file.read_text())["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{conf_file}: no base_model_name_or_path ({type(e).__name__}: {e})") from None
    weights = root / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{root}: not an adapter export (no adapter_model.safetensors)")
    problem = safetensors_problem(weights)
    if problem:
        raise ModelError(f"{weights}: {problem}")
    from peft import PeftModel
    from transformers import AutoTokenizer

    start = Encoder.from_pretrained(base)
    st = read_st_settings(str(root))
    try:
        model = PeftModel.from_pretrained(start.transformer, str(root)).merge_and_unload()
    except (RuntimeError, KeyError, ValueError) as e:  # adapters that do not fit the base model
        raise ModelError(f"{root}: its adapters do not fit the base model {base} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    staging = dest.parent / f".tmp-{dest.name}"
    shutil.rmtree(staging, ignore_errors=True)
    Encoder(model, AutoTokenizer.from_pretrained(str(root)), pooling=st.get("pooling", start.pooling),
            normalize=st.get("normalize", start.normalize),
            max_seq_length=st.get("max_seq_length", start.max_seq_length),
            extra_state=start.extra_state, st_config=st.get("st_config"), dense=st.get("dense", ())).save(
        staging, dtype=start.source_dtype)  # merged in fp32, stored as the base model is
    if (root / "README.md").is_file():
        shutil.copyfile(root / "README.md", staging / "README.md")
    if dest.exists():  # --overwrite (checked above)
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    staging.rename(dest)
