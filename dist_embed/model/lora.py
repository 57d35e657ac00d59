"""LoRA through the ``peft`` library: only the adapters train; checkpoints hold the merged weights
(every checkpoint is a complete sentence-transformers model) and the adapters (for exact resume);
``final/`` is the merged model or, with ``model.lora.export: adapter``, the adapter alone."""
from __future__ import annotations

import json
from pathlib import Path

import torch

ADAPTER_FILE = "adapter.safetensors"  # in a checkpoint's training_state/


def apply_lora(transformer, spec):
    """``transformer`` wrapped by peft with the adapters ``spec`` (config.LoraSpec) describes."""
    from peft import LoraConfig, get_peft_model

    conf = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                      target_modules=list(spec.target_modules) if spec.target_modules else None)
    return get_peft_model(transformer, conf)


def is_lora(transformer) -> bool:
    return hasattr(transformer, "peft_config")


def base_model(transformer):
    """The plain transformers model under a peft wrapper (the model itself otherwise)."""
    return transformer.get_base_model() if is_lora(transformer) else transformer


def merged_parts(transformer, is_main: bool = True):
    """The base model's weights with every adapter's delta added, under the base model's own names,
    one module at a time (``weights.module_weights``: under ZeRO-3 each LoRA layer's base weight
    and adapters are gathered together). The modules are left untouched (merging in place and back
    would perturb the base weights)."""
    from peft.tuners.lora import LoraLayer

    from .weights import module_weights

    def merged(name: str, layer) -> dict[str, torch.Tensor]:
        out = {f"{name}.{k}": v for k, v in layer.base_layer.state_dict().items()}
        weight = out[f"{name}.weight"]
        out[f"{name}.weight"] = weight + layer.get_delta_weight("default").to(weight.dtype)
        return out

    return module_weights(base_model(transformer), is_main, whole={LoraLayer: merged})


def adapter_state(transformer) -> dict[str, torch.Tensor]:
    """The adapters' weights in peft's file naming. Every rank must call it (ZeRO-3 gathers them)."""
    from peft import get_peft_model_state_dict

    from .weights import full_parameters

    with full_parameters(p for n, p in transformer.named_parameters() if "lora_" in n):
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(transformer).items()}


def load_adapter_state(transformer, state: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter weights INTO the existing parameters (peft's set_peft_model_state_dict may
    put new Parameter objects in place, which the optimizer and the gradient all-reduce, holding the
    old ones, would never see: a resume that silently stops training)."""
    params = dict(transformer.named_parameters())
    wanted = {n for n in params if "lora_" in n}
    named = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        named[f"{head}.default.{leaf}"] = value
    if set(named) != wanted:
        raise ValueError(f"adapter weights do not match the model: missing {sorted(wanted - set(named))[:3]}, "
                         f"unexpected {sorted(set(named) - wanted)[:3]}")
    with torch.no_grad():
        for name, value in named.items():
            params[name].copy_(value)


def write_adapter(out: Path, transformer, base_path: str, state: dict[str, torch.Tensor]) -> None:
    """PEFT's adapter layout (adapter_config.json + adapter_model.safetensors; ``state`` from
    ``adapter_state``), naming the base model so that transformers (and so sentence-transformers)
    loads base + adapter from ``out``."""
    from safetensors.torch import save_file

    conf = transformer.peft_config["default"].to_dict()
    conf["base_model_name_or_path"] = base_path
    conf = {k: (sorted(v) if isinstance(v, set) else v) for k, v in conf.items()}
    (out / "adapter_config.json").write_text(json.dumps(conf, indent=2, default=str) + "\n")
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
