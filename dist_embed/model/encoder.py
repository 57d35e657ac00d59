"""Encoder = Hugging Face AutoModel + pooling + optional L2 normalisation.

Reads and writes the sentence-transformers directory layout (modules.json, 1_Pooling/,
2_Normalize/, sentence_bert_config.json) so that ``SentenceTransformer(path)`` loads what we save.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.batch import to_device
from ..data.layout import Packed, Unpadded
from ..families import family, is_causal, position_limit, takes_layout
from .pooling import pool, pool_tokens
from .st_modules import POOLING_KEYS, Dense, ModelError, check_model_dir, read_st_settings  # noqa: F401

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = "5GB"  # per safetensors file, as transformers' save_pretrained
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                "activation_dropout", "classifier_dropout", "hidden_dropout", "attention_dropout_prob")


def resolve_model_path(name_or_path: str) -> str:
    """``package:MODULE/sub/dir`` points inside an installed Python package (offline weights)."""
    if name_or_path.startswith("package:"):
        module, _, sub = name_or_path[len("package:"):].partition("/")
        try:
            root = Path(import_module(module).__file__).parent
        except ImportError:
            raise FileNotFoundError(f"model.name_or_path {name_or_path!r}: Python package {module!r} "
                                    f"is not installed") from None
        return str(root / sub)
    return name_or_path


@contextmanager
def loading(name_or_path: str):
    """transformers' loading errors as one ModelError line naming the model (a hub id that is not
    cached and cannot be downloaded: offline, or a typo; a revision that does not exist)."""
    try:
        yield
    except (OSError, ValueError) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        hint = "" if Path(name_or_path).exists() else \
            " (a hub id that is neither cached here nor downloadable: offline, HF_HUB_OFFLINE set, or misspelt?)"
        raise ModelError(f"{name_or_path}: cannot be loaded{hint}: {first}") from None


class Encoder(nn.Module):
    """Texts -> fixed-size embeddings. ``forward`` takes tokenized features, ``encode`` raw texts."""

    def __init__(self, transformer: nn.Module, tokenizer, pooling: str = "mean", normalize: bool = False,
                 max_seq_length: int = 256, extra_state: dict | None = None, st_config: dict | None = None,
                 dense: Sequence[Dense] = (), source_dtype: torch.dtype = torch.float32):
        super().__init__()
        # the dtype the starting checkpoint was stored in (its weights are loaded as fp32 whatever
        # it is: model.save_dtype "auto" writes the trained model back in it)
        self.source_dtype = source_dtype
        self.transformer = transformer
        # sentence-transformers Dense modules after pooling (trained, saved in their own folders)
        self.st_dense = nn.ModuleList(dense)
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_seq_length = max_seq_length
        # Weights we do not train but keep so saved checkpoints stay complete (e.g. BERT's pooler).
        self.extra_state = extra_state or {}
        # sentence-transformers settings of the starting model we keep unchanged (prompts, ...)
        self.st_config = dict(st_config or {})
        # decoders build a key/value cache in every forward unless told not to (and its update can
        # upcast the values): an embedder never decodes, so no forward of ours asks for one
        self.causal = is_causal(transformer.config)
        self.forward_options = {"use_cache": False} if self.causal else {}

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, pooling: str | None = None, normalize: bool | None = None,
                        max_seq_length: int | None = None, dropout: float | None = None,
                        trust_remote_code: bool = False, revision: str | None = None) -> "Encoder":
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = resolve_model_path(name_or_path)
        check_model_dir(path)
        st = read_st_settings(path) if os.path.isdir(path) else {}
        with loading(name_or_path):
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
        if dropout is not None:
            for key in DROPOUT_KEYS:
                if isinstance(getattr(config, key, None), float):
                    setattr(config, key, dropout)
        model_cls = AutoModel
        fam = family(config)
        if fam is not None and fam.encoder_class:  # encoder-decoder checkpoints: the encoder alone
            import transformers

            model_cls = getattr(transformers, fam.encoder_class)
        source_dtype = checkpoint_dtype(path, config, revision)  # before loading sets config.dtype
        # fp32 master weights whatever the file's dtype: transformers would otherwise load a bf16 or
        # fp16 checkpoint as it is stored (dtype "auto"), and AdamW's updates to half-precision
        # weights mostly round away (the run's precision is autocast's business, not the weights')
        with loading(name_or_path):
            transformer = model_cls.from_pretrained(path, config=config, trust_remote_code=trust_remote_code,
                                                    revision=revision, dtype=torch.float32)
        extra = {}
        # The pooler (a dense layer on [CLS]) is never used by pooled sentence embeddings; under a
        # gradient all-reduce it only costs time. Detach it but keep its weights for saving.
        if getattr(transformer, "pooler", None) is not None:
            from .weights import full_parameters

            with full_parameters(transformer.pooler.parameters()):  # ZeRO-3 built it partitioned
                extra = {f"pooler.{k}": v.detach().clone() for k, v in transformer.pooler.state_dict().items()}
            transformer.pooler = None
        with loading(name_or_path):
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
        limit = position_limit(config)
        msl = max_seq_length or st.get("max_seq_length") or \
            min(limit, getattr(tokenizer, "model_max_length", limit) or limit)
        if limit and int(msl) > limit:
            raise ModelError(f"model.max_seq_length={msl} is more than {name_or_path} can take: its position "
                                  f"embeddings cover {limit} tokens (set model.max_seq_length <= {limit})")
        return cls(transformer, tokenizer, pooling=pooling or st.get("pooling", "mean"),
                   normalize=st.get("normalize", False) if normalize is None else normalize,
                   max_seq_length=int(msl), extra_state=extra, st_config=st.get("st_config"),
                   dense=[d.float() for d in st.get("dense", ())], source_dtype=source_dtype)

    @property
    def dim(self) -> int:
        """The embedding size (the last Dense module's output, if any)."""
        return int(self.st_dense[-1].out_features) if len(self.st_dense) else int(self.transformer.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def forward(self, inputs) -> torch.Tensor:
        """Sentence embeddings: transformer, pooling, Dense modules, normalisation. ``inputs``: padded
        features (a dict of [texts, length] tensors), or a layout of the texts (``data/layout.py``:
        ``Unpadded`` through the variable-length attention, ``Packed`` rows with a block-diagonal
        mask), pooled here too so a wrapping engine (ZeRO-3) sees every parameter used."""
        if isinstance(inputs, Unpadded):
            from .varlen import no_mask

            states = self.transformer(input_ids=inputs.input_ids[None], position_ids=inputs.position_ids[None],
                                      attention_mask=no_mask(inputs.input_ids), cu_seq_lens_q=inputs.cu_seqlens,
                                      cu_seq_lens_k=inputs.cu_seqlens, max_length_q=inputs.max_seqlen,
                                      max_length_k=inputs.max_seqlen, return_dict=True,
                                      **self.forward_options).last_hidden_state[0]
            emb = pool_tokens(states[:sum(inputs.lengths)], inputs.counts, self.pooling)  # fillers dropped
        elif isinstance(inputs, Packed):
            segment = inputs.segment
            # padding cells attend among themselves (a fully masked query row would give NaN)
            mask = (segment[:, :, None] == segment[:, None, :])[:, None]
            states = self.transformer(input_ids=inputs.input_ids, position_ids=inputs.position_ids,
                                      token_type_ids=torch.zeros_like(segment), attention_mask=mask,
                                      return_dict=True, **self.forward_options).last_hidden_state
            emb = pool_tokens(states.reshape(-1, states.shape[-1])[inputs.slot], inputs.counts, self.pooling)
        else:
            names = ("input_ids", "token_type_ids")
            out = self.transformer(**{k: v for k, v in inputs.items() if k in names}, return_dict=True,
                                   attention_mask=self._padded_mask(inputs["attention_mask"]), **self.forward_options)
            emb = pool(out.last_hidden_state, inputs["attention_mask"], self.pooling)
        for dense in self.st_dense:
            emb = dense(emb)
        if self.normalize:
            emb = F.normalize(emb.float(), p=2, dim=-1)
        return emb

    def _padded_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The attention mask of a padded forward. Where the family takes our layouts and the
        attention applies boolean masks, a 4D mask built here on the device: transformers returns
        it as given, where from the 2D mask it would first read it back (``padding_mask.all()``: can
        the mask be skipped?), a wait for the GPU in every forward. Elsewhere the 2D mask."""
        from .layout_choice import MASK_AWARE

        config = self.transformer.config
        if getattr(config, "_attn_implementation", None) not in MASK_AWARE or not (
                takes_layout(config, "packed") or takes_layout(config, "unpadded")):
            return attention_mask
        keys = attention_mask.bool()[:, None, None, :]  # [texts, 1, 1, length]: real keys only
        if not self.causal:  # bidirectional: every query sees its text's real tokens
            return keys
        n = attention_mask.shape[1]
        causal = torch.ones((n, n), dtype=torch.bool, device=keys.device).tril()
        # a left-padded text's padding rows would see no key (NaN): they see themselves
        return (keys & causal) | torch.eye(n, dtype=torch.bool, device=keys.device)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Padded to the longest text, truncated to max_seq_length: the training batches' path."""
        from ..data.tokenization import tokenize_columns

        return tokenize_columns(self.tokenizer, [list(texts)], self.max_seq_length)[0]

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64, prompt_name: str | None = None) -> np.ndarray:
        """Embeddings as float32 numpy, in input order. As sentence-transformers' ``encode``: the
        prompt ``prompt_name`` names if the model has it (``encode_query``/``encode_document`` pass
        "query"/"document"), else the model's default prompt, goes before each text; the output is
        cut to ``truncate_dim`` (if set)."""
        out = self.embed_texts(texts, batch_size, prompt_name).float().cpu().numpy()
        return out[:, :self.st_config["truncate_dim"]] if self.st_config.get("truncate_dim") else out

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64, prompt_name: str | None = None) -> torch.Tensor:
        """``encode`` without the read-back: [texts, dim] on the model's device, in input order
        (batches sorted by length for speed; their inputs copied without the host waiting), so a
        training step can use it (the guide model's scores) and never wait for the device."""
        prompts = self.st_config.get("prompts") or {}
        name = prompt_name if prompt_name in prompts else self.st_config.get("default_prompt_name")
        prompt = prompts.get(name or "")
        if prompt:
            texts = [prompt + t for t in texts]
        was_training = self.training
        self.eval()
        order = np.argsort([-len(t) for t in texts], kind="stable")
        dev = self.device
        parts = [self(to_device(self.tokenize([texts[i] for i in order[start:start + batch_size]]), dev))
                 for start in range(0, len(texts), batch_size)]
        self.train(was_training)
        if not parts:
            return torch.zeros((0, self.dim), device=dev)
        back = to_device(torch.from_numpy(np.argsort(order, kind="stable")), dev)  # sorted -> input order
        return torch.cat(parts)[back]

    # ------------------------------------------------------------------------------------------
    # sentence-transformers layout

    def weight_parts(self, is_main: bool = True):
        """The weights as ``state_for_saving`` keys them, one module at a time (a LoRA layer with its
        adapters merged in; Dense keys start with ``st_dense.``). Under ZeRO-3 a collective: every
        rank iterates it to the end, rank 0 gets the tensors (``weights.module_weights``)."""
        from .lora import is_lora, merged_parts
        from .weights import module_weights

        yield from (merged_parts(self.transformer, is_main) if is_lora(self.transformer)
                    else module_weights(self.transformer, is_main))
        yield from module_weights(self.st_dense, is_main, prefix="st_dense.")

    def state_for_saving(self) -> dict[str, torch.Tensor]:
        """Every weight ``save`` writes (the transformer's, LoRA merged; Dense; kept extras), on CPU."""
        state = {k: v for part in self.weight_parts() for k, v in part.items()}
        state.update({k: v.contiguous() for k, v in self.extra_state.items() if k not in state})
        return state

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Inverse of ``state_for_saving`` (strict: a missing or unexpected weight is an error)."""
        self.transformer.load_state_dict({k: v for k, v in weights.items() if k not in self.extra_state
                                          and not k.startswith("st_dense.")}, strict=True)
        self.st_dense.load_state_dict({k.removeprefix("st_dense."): v for k, v in weights.items()
                                       if k.startswith("st_dense.")}, strict=True)

    @staticmethod
    def saved_weights(directory: str | Path) -> dict[str, torch.Tensor]:
        """What ``save`` wrote, keyed as ``state_for_saving`` returns it (shards read whole)."""
        from safetensors.torch import load_file

        from .weights import read_weights

        root = Path(directory)
        weights = read_weights(root)
        modules = json.loads((root / "modules.json").read_text())
        dense = [m["path"] for m in modules if m.get("type", "").endswith(".Dense")]
        for i, path in enumerate(dense):
            dense_weights = load_file(str(root / path / "model.safetensors"))
            weights.update({f"st_dense.{i}.{k}": v for k, v in dense_weights.items()})
        return weights

    def save(self, out_dir: str | Path, parts: Iterable[dict[str, torch.Tensor]] | None = None,
             max_shard_size: str | int = DEFAULT_SHARD_SIZE, dtype: torch.dtype | None = None) -> None:
        """Write a complete sentence-transformers model directory (weights as safetensors only).
        ``parts``: the weights as ``state_for_saving`` keys them, in pieces (e.g. gathered from
        ZeRO-3 one module at a time); the transformer's are written in shards of ``max_shard_size``.
        ``dtype``: the floating weights are written in it (and config.json says so); None: as held."""
        from safetensors.torch import save_file

        from ..config.schema import parse_size
        from .weights import remove_weights, write_weights

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        remove_weights(out)  # a directory saved into again: no stale shard or index left beside
        parts = self.weight_parts() if parts is None else parts  # one module at a time
        state: dict[str, torch.Tensor] = {}  # the Dense modules' weights (small), kept for their folders

        def cast(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in part.items()}

        def transformer_parts():
            for part in map(cast, parts):
                state.update({k: v for k, v in part.items() if k.startswith("st_dense.")})
                yield {k: v for k, v in part.items() if not k.startswith("st_dense.")}
            yield cast({k: v.contiguous() for k, v in self.extra_state.items()})

        write_weights(out, transformer_parts(), parse_size(max_shard_size))
        from .lora import base_model

        config = base_model(self.transformer).config
        held = config.dtype
        config.dtype = dtype or held  # what from_pretrained's dtype "auto" then loads it as
        try:
            config.save_pretrained(out)
        finally:
            config.dtype = held
        self.tokenizer.save_pretrained(out)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        for i, dense in enumerate(self.st_dense):
            idx = len(modules)
            folder = out / f"{idx}_Dense"
            folder.mkdir(exist_ok=True)
            prefix = f"st_dense.{i}."
            save_file({k[len(prefix):]: v.contiguous() for k, v in state.items() if k.startswith(prefix)},
                      str(folder / "model.safetensors"), metadata={"format": "pt"})
            _write_json(folder / "config.json", dense.config())
            modules.append({"idx": idx, "name": str(idx), "path": folder.name,
                            "type": "sentence_transformers.models.Dense"})
        if self.normalize:
            idx = len(modules)
            modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            (out / f"{idx}_Normalize").mkdir(exist_ok=True)
        _write_json(out / "modules.json", modules)
        _write_json(out / "sentence_bert_config.json", {"max_seq_length": self.max_seq_length, "do_lower_case": False})
        _write_json(out / "config_sentence_transformers.json", {
            "__version__": _versions(), "model_type": "SentenceTransformer", "prompts": {},
            "default_prompt_name": None, "similarity_fn_name": "cosine", **self.st_config})
        (out / "1_Pooling").mkdir(exist_ok=True)
        _write_json(out / "1_Pooling" / "config.json", self.pooling_config())

    def pooling_config(self) -> dict:
        """sentence-transformers' Pooling config for our mode."""
        pooling = {"word_embedding_dimension": int(self.transformer.config.hidden_size)}
        pooling.update({key: (name == self.pooling) for name, key in POOLING_KEYS.items()})
        pooling.update({"pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
                        "include_prompt": True})
        return pooling


def checkpoint_dtype(path: str, config, revision: str | None = None) -> torch.dtype:
    """The dtype a checkpoint is stored in, as transformers' ``dtype="auto"`` reads it: the one its
    config.json states, else the one most of its safetensors weights have; fp32 if neither says."""
    stated = getattr(config, "dtype", None)
    if isinstance(stated, str):
        stated = getattr(torch, stated, None)
    if isinstance(stated, torch.dtype) and stated.is_floating_point:
        return stated
    from .weights import stored_dtype

    root = Path(path)
    if not root.is_dir():  # a hub id: the snapshot directory its config was read from
        try:
            from transformers.utils import cached_file

            root = Path(cached_file(path, "config.json", revision=revision)).parent
        except (OSError, ValueError, TypeError):
            return torch.float32
    try:
        return stored_dtype(root) or torch.float32
    except (OSError, ValueError):
        return torch.float32


def _versions() -> dict:
    import transformers

    v = {"dist_embed": _own_version(), "transformers": transformers.__version__, "pytorch": torch.__version__}
    return v


def _own_version() -> str:
    try:
        from importlib.metadata import version

        return version("dist_embed")
    except Exception:
        return "0+unknown"


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
