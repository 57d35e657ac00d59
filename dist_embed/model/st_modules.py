"""The sentence-transformers modules around the transformer that we read, check and rebuild:
Pooling settings, Dense layers, Normalize, the kept settings of config_sentence_transformers.json,
and the checks that refuse a model we cannot represent (one line, never a silently other model)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
                "lasttoken": "pooling_mode_lasttoken"}
ST_KEPT = ("prompts", "default_prompt_name", "similarity_fn_name", "truncate_dim")


def read_st_settings(path: str) -> dict:
    """Pooling, normalize and max_seq_length from a sentence-transformers model directory, if it is one."""
    root = Path(path)
    out: dict = {}
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return out
    modules = json.loads(modules_file.read_text())
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    # Transformer, Pooling, any Dense layers, then Normalize: what we can train and write back whole;
    # anything else would be dropped or reordered, so it is refused (never a silently different model)
    pattern = re.fullmatch(r"T P(?: D)*(?: N)?", " ".join({"Transformer": "T", "Pooling": "P", "Dense": "D",
                                                            "Normalize": "N"}.get(k, "?") for k in kinds))
    if not pattern:
        bad = next(((k, m.get("path", "")) for k, m in zip(kinds, modules)
                    if k not in ("Transformer", "Pooling", "Dense", "Normalize")), None)
        what = (f"module {bad[0]} ({bad[1] or 'top level'}) is not supported by dist_embed (Transformer, Pooling, "
                "Dense, Normalize)") if bad else f"modules in the order {' -> '.join(kinds)} are not supported " \
               "(Transformer -> Pooling -> Dense... -> Normalize)"
        raise ModelError(f"{root}: {what}; training would drop or reorder it and save a different model")
    out["dense"] = [read_dense(root / m["path"]) for k, m in zip(kinds, modules) if k == "Dense"]
    out["normalize"] = "Normalize" in kinds
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            pcfg = json.loads((root / m["path"] / "config.json").read_text())
            modes = [name for name, key in POOLING_KEYS.items() if pcfg.get(key)]
            mode = pcfg.get("pooling_mode")  # sentence-transformers >= 6 names the mode instead
            if mode is not None:
                modes = [mode] if isinstance(mode, str) else list(mode)
                unknown = [m for m in modes if m not in POOLING_KEYS]
                if unknown or len(modes) != 1:
                    raise ModelError(f"{root}: pooling {modes} is not supported (mean, cls, max or lasttoken)")
            unsupported = [k for k, v in pcfg.items() if k.startswith("pooling_mode_") and v and
                           k not in POOLING_KEYS.values()]
            if unsupported or len(modes) != 1:
                raise ModelError(f"{root}: pooling {unsupported or modes} is not supported "
                                 "(mean, cls, max or lasttoken)")
            if pcfg.get("include_prompt") is False:
                raise ModelError(f"{root}: pooling with include_prompt=false (prompt tokens left out of the "
                                 "mean) is not supported; dist_embed pools every token")
            out["pooling"] = modes[0]
    stc = root / "config_sentence_transformers.json"
    if stc.is_file():  # kept as they are and written back on save: prompts, similarity, truncate_dim
        conf = json.loads(stc.read_text())
        out["st_config"] = {k: conf[k] for k in ST_KEPT if k in conf}
    sbc = root / "sentence_bert_config.json"
    if sbc.is_file():
        out["max_seq_length"] = json.loads(sbc.read_text()).get("max_seq_length")
    return out


# activations a sentence-transformers Dense module may name that we rebuild (by their torch class)
ACTIVATIONS = {f"torch.nn.modules.{mod}.{name}": name for mod, name in (
    ("activation", "Tanh"), ("activation", "ReLU"), ("activation", "GELU"), ("activation", "Sigmoid"),
    ("activation", "SiLU"), ("linear", "Identity"))}


class Dense(nn.Module):
    """sentence-transformers' Dense module (activation(linear(embedding))): trained with the encoder,
    written back to its own folder with the same config and weight names."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "torch.nn.modules.activation.Tanh"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias, self.activation_name = bias, activation
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation_function = getattr(nn, ACTIVATIONS[activation])()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation_function(self.linear(x))

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias,
                "activation_function": self.activation_name}


def read_dense(folder: Path) -> Dense:
    """A Dense module from its folder (config.json + model.safetensors, or an older pytorch_model.bin)."""
    conf = json.loads((folder / "config.json").read_text())
    act = conf.get("activation_function", "torch.nn.modules.activation.Tanh")
    unsupported = {k: v for k, v in conf.items() if k in ("use_residual",) and v or
                   k in ("module_input_name", "module_output_name") and v not in (None, "sentence_embedding")}
    if act not in ACTIVATIONS or unsupported:
        raise ModelError(f"{folder}: Dense with {unsupported or {'activation_function': act}} is not supported "
                         f"(activations: {', '.join(sorted(v for v in ACTIVATIONS.values()))})")
    dense = Dense(int(conf["in_features"]), int(conf["out_features"]), bool(conf.get("bias", True)), act)
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        weights = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        weights = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ModelError(f"{folder}: Dense module without weights (model.safetensors or pytorch_model.bin)")
    try:
        dense.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{folder}: Dense weights do not match its config ({str(e).splitlines()[0]})") from None
    return dense


class ModelError(ValueError):
    """A model that cannot be used as asked: not a model directory, a truncated weights file, a
    setting it cannot honour. The CLI reports it as one line with exit code 2."""


def check_model_dir(path: str) -> None:
    """Raise ModelError unless ``path`` looks like a loadable model (a hub id passes through)."""
    p = Path(path)
    if not p.exists():
        looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
        if looks_like_hub_id:
            return
        raise ModelError(f"not a model directory: {path} (no such file or directory)")
    if not p.is_dir():
        raise ModelError(f"not a model directory: {path} (a file)")
    if not (p / "config.json").is_file():
        raise ModelError(f"not a model directory: {path} (no config.json)")
    for weights in sorted(p.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise ModelError(f"{weights}: {problem}")


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unusable (None if its header and size agree)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                return f"truncated (size {size} bytes, shorter than its header)"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"not a safetensors file ({e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + n + end:
        return f"truncated (size {size} bytes, expected {8 + n + end})"
    return None
