"""The typed configuration: every key with its default, validated once at load into frozen
pydantic models (a typo in a cluster job fails in the first second, not an hour later on rank 7)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from .hard_negatives import HardNegativesConfig
from .paths import LocalPath, OutputPath, absolute_paths


class _Section(BaseModel):
    # inf and nan are never a useful setting (nan already fails every bound; inf passes ``gt=0``)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LoraSpec(_Section):
    """LoRA adapters (peft): only they train."""

    r: int = Field(default=16, gt=0)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | None = None  # None: peft's default for the architecture
    export: Literal["merged", "adapter"] = "merged"  # final/: merged weights, or the adapter alone


class ModelConfig(_Section):
    name_or_path: LocalPath = "sentence-transformers/all-MiniLM-L6-v2"
    # None: read from a sentence-transformers directory, else mean
    pooling: Literal["mean", "cls", "max", "lasttoken"] | None = None
    normalize: bool | None = None  # None: read from a sentence-transformers dir, else False
    max_seq_length: int | None = Field(default=None, gt=0)
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    trust_remote_code: bool = False
    revision: str | None = None
    lora: LoraSpec | None = None
    # the dtype checkpoints and final/ store the weights in (training always keeps fp32 master
    # weights); "auto": the starting checkpoint's (a bf16 model stays a bf16 model)
    save_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


FORMAT = Literal["auto", "jsonl", "csv", "tsv", "parquet", "hf", "wds"]


class LossConfig(_Section):
    name: Literal["mnrl", "cached_mnrl", "cosine", "triplet"] = "mnrl"
    scale: float = Field(default=20.0, gt=0)  # mnrl / cached_mnrl
    gather_across_devices: bool | None = None  # default: on when world size > 1
    mini_batch_size: int = Field(default=32, gt=0)  # cached_mnrl
    # cached_mnrl: mini-batches by padded tokens (rows x longest row <= this) instead of by rows, so long
    # and short texts use about the same memory per mini-batch; same loss and gradients
    mini_batch_tokens: int | None = Field(default=None, gt=0)
    margin: float = Field(default=5.0, ge=0)  # triplet
    distance: Literal["euclidean", "cosine", "manhattan"] = "euclidean"  # triplet
    # cosine: the gold label is score / score_max (STS sets score 0-5; CosineSimilarityLoss wants 0-1)
    score_max: float = Field(default=1.0, gt=0)
    # Matryoshka (Kusupati et al. 2022): the loss is also taken on the first d dimensions of the
    # embeddings for each d, weighted (default 1 each), e.g. [384, 256, 128, 64]
    matryoshka_dims: list[Annotated[int, Field(gt=0)]] | None = None
    matryoshka_weights: list[Annotated[float, Field(gt=0)]] | None = None
    # mnrl / cached_mnrl: in-batch candidates (gathered from every rank) that are likely positives
    # are left out of the softmax: the same text as the anchor's positive, and/or (GISTEmbed-style)
    # those a guide model scores above its anchor-positive score (- margin, or x (1 - margin))
    mask_same_text: bool = False
    guide_model: LocalPath | None = None
    guide_margin: float = Field(default=0.0, ge=0)
    guide_margin_strategy: Literal["absolute", "relative"] = "absolute"

    @model_validator(mode="after")
    def _matryoshka(self):
        if self.mini_batch_tokens and self.name != "cached_mnrl":
            raise ValueError(f"mini_batch_tokens sizes cached_mnrl's mini-batches; loss {self.name} has none")
        if (self.mask_same_text or self.guide_model) and self.name not in ("mnrl", "cached_mnrl"):
            raise ValueError(f"mask_same_text / guide_model filter in-batch negatives: loss {self.name} has none "
                             "(use mnrl or cached_mnrl)")
        dims, weights = self.matryoshka_dims, self.matryoshka_weights
        if dims is not None and not dims:
            raise ValueError("matryoshka_dims: an empty list (leave it out for no Matryoshka)")
        if dims and len(set(dims)) != len(dims):
            raise ValueError(f"matryoshka_dims: {dims} names a dimension twice")
        if weights is not None and (dims is None or len(weights) != len(dims)):
            raise ValueError(f"matryoshka_weights: {len(weights)} weights for "
                             f"{len(dims or [])} matryoshka_dims; give one weight per dimension")
        return self

    def matryoshka(self) -> tuple[tuple[int, float], ...]:
        """(dimension, weight) pairs; () without Matryoshka."""
        if not self.matryoshka_dims:
            return ()
        return tuple(zip(self.matryoshka_dims, self.matryoshka_weights or [1.0] * len(self.matryoshka_dims)))


class DatasetConfig(_Section):
    """One of several training datasets (``data.train`` as a list)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # metrics keys: loss/<name>, data/<name>/rows
    path: LocalPath
    format: FORMAT = "auto"
    columns: dict[str, str] = Field(default_factory=dict)
    subset: str | None = None
    split: str = "train"
    streaming: bool = True
    max_rows: int | None = Field(default=None, gt=0)
    loss: LossConfig | None = None  # None: the top-level loss section
    prompts: dict[str, str] = Field(default_factory=dict)  # our column -> text put in front, e.g. "query: "
    weight: float | None = Field(default=None, gt=0)  # data.sampler=weighted


class DataConfig(_Section):
    # a file, directory, shard set (directory with manifest.json, brace pattern, URL) or hub id;
    # or a list of named datasets, each with its own loss and prompts
    train: LocalPath | list[DatasetConfig]
    format: FORMAT = "auto"
    columns: dict[str, str] = Field(default_factory=dict)  # our column -> column in the source
    subset: str | None = None  # Hugging Face dataset config name, e.g. "triplet"
    split: str = "train"
    streaming: bool = True
    prompts: dict[str, str] = Field(default_factory=dict)  # our column -> text put in front of it
    # several datasets: each global batch comes from one of them (see dist_embed/data/mixing.py)
    sampler: Literal["proportional", "round_robin", "temperature", "weighted"] = "proportional"
    temperature: float = Field(default=1.0, gt=0)  # sampler=temperature: p ~ rows ** (1 / temperature)
    shuffle: bool = True
    shuffle_buffer: int = Field(default=10_000, gt=0)
    no_duplicates: bool = False
    dedup_buffer: int | None = Field(default=None, gt=0)  # rows deferred at most; default 16 global batches
    on_error: Literal["raise", "skip"] = "raise"
    max_skip_fraction: float = Field(default=0.01, ge=0.0, le=1.0)
    # who plans the batches: "global": every rank reads and plans every row (the same batches at any
    # world size); "sharded": each rank reads and plans only its share, no-duplicates by exchanging
    # hashes (scales with the cluster); "auto": sharded with several processes where the data allows
    # (local files, prepared shards), global otherwise; a resume keeps its checkpoint's plane
    plane: Literal["auto", "global", "sharded"] = "auto"
    max_rows: int | None = Field(default=None, gt=0)
    # dataloader processes that tokenize and lay out the batches; "auto": none on CPU (the cores
    # train), on a GPU a few per rank (docs/performance.md)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    # the sharded plane: processes per rank that read (parse, validate) its next pieces ahead of
    # its planner; "auto": as num_workers' auto (none on CPU)
    read_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    # batches planned, received from the workers and pinned in a background thread, ahead of the
    # step; "auto": on a GPU (whose step runs while the host prepares), not on CPU (its cores train)
    prefetch: bool | Literal["auto"] = "auto"
    # hard negatives re-mined during training with the current weights (None: off; config/hard_negatives.py)
    hard_negatives: HardNegativesConfig | None = None

    @model_validator(mode="after")
    def _check_mix(self) -> "DataConfig":
        if isinstance(self.train, list):
            if not self.train:
                raise ValueError("train: an empty list of datasets")
            names = [d.name for d in self.train]
            dup = next((n for n in names if names.count(n) > 1), None)
            if dup:
                raise ValueError(f"train: two datasets are named {dup!r}; names must be unique")
            weights = [d.weight for d in self.train]
            if self.sampler == "weighted" and None in weights:
                missing = names[weights.index(None)]
                raise ValueError(f"sampler weighted needs a weight on every dataset; {missing!r} has none")
            if self.sampler != "weighted" and any(w is not None for w in weights):
                raise ValueError(f"datasets have weights but sampler is {self.sampler}; set data.sampler=weighted")
        return self

    def datasets(self) -> list[DatasetConfig]:
        """Every training dataset; a single ``train`` path is one dataset named "train"."""
        if isinstance(self.train, list):
            return list(self.train)
        return [DatasetConfig(name="train", path=self.train, format=self.format, columns=self.columns,
                              subset=self.subset, split=self.split, streaming=self.streaming,
                              max_rows=self.max_rows, prompts=self.prompts)]


class TrainingConfig(_Section):
    batch_size: int = Field(default=32, gt=0)  # per process
    max_steps: int = -1  # optimizer steps; -1: run `epochs` epochs
    epochs: int = Field(default=1, gt=0)
    lr: float = Field(default=5e-5, gt=0)
    warmup_ratio: float = Field(default=0.0, ge=0, le=1)
    warmup_steps: int = Field(default=0, ge=0)  # wins over warmup_ratio when > 0
    weight_decay: float = Field(default=0.01, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = Field(default=1, gt=0)
    seed: int = 42
    log_steps: int = Field(default=10, gt=0)
    # >0: encode the texts of all columns pooled, sorted by length, in chunks of this many (less padding,
    # same maths); 0: one padded forward per column, as sentence-transformers does
    length_sorted_chunks: int = Field(default=16, ge=0)
    # How a batch's texts meet the encoder (same maths in every layout): "unpadded": every real token
    # of every text through one variable-length attention (CUDA, bf16/fp16; BERT, RoBERTa, XLM-R and
    # the decoder embedders); "packed": side by side in rows with a block-diagonal mask (BERT-type
    # encoders; the fastest on CPU); "padded": each column padded, encoded in length_sorted_chunks.
    # "auto": unpadded where the device and model can, else packed (with pack_length), else padded.
    layout: Literal["auto", "unpadded", "packed", "padded"] = "auto"
    # packed rows: "auto": as wide as the batch's longest text (least attention work); N > 0: rows
    # of N tokens (wider if a text is); 0: no packing (auto then means padded off CUDA)
    pack_length: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    # torch.compile the encoder, with dynamic shapes: one graph for every token count
    compile: bool = False
    # unpadded: the token count rounded up to a multiple of this with filler texts (0: off); compile
    # needs none (dynamic shapes), and cached MNRL's mini-batches are never rounded
    layout_bucket: int = Field(default=0, ge=0)
    # CPU only: dropout masks from a vectorised uniform draw instead of torch's element-wise
    # bernoulli_ (same distribution, faster steps). GPUs keep their fused kernels.
    fast_dropout: bool = True
    # recompute each layer's activations in the backward pass instead of keeping them (less memory,
    # more compute); dropout masks are replayed, so loss and gradients are unchanged
    gradient_checkpointing: bool = False

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be a positive number of optimizer steps, or -1 to run training.epochs epochs")
        return v


class StsSet(_Section):
    name: str
    path: LocalPath  # a file, or a Hugging Face dataset (e.g. sentence-transformers/stsb)
    split: str = "validation"  # Hugging Face datasets only
    subset: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)  # sentence1 / sentence2 / score -> the source's names


class DataRef(_Section):
    """A file, or a Hugging Face dataset with its subset and split."""

    path: LocalPath
    subset: str | None = None
    split: str = "train"


class RetrievalSet(_Section):
    """Queries, corpus and relevance judgements (BEIR layout), each a path or a DataRef."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    queries: LocalPath | DataRef
    corpus: LocalPath | DataRef
    qrels: LocalPath | DataRef


class EvalConfig(_Section):
    sts: list[StsSet] = Field(default_factory=list)
    # information retrieval (MRR@10, NDCG@10, recall@k, MAP@100); the corpus is embedded across ranks
    retrieval: list[RetrievalSet] = Field(default_factory=list)
    steps: int = Field(default=0, ge=0)  # 0: only before and after training
    batch_size: int = Field(default=64, gt=0)
    before_training: bool = True


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """"5GB" -> 5e9 bytes (decimal units as transformers' ``max_shard_size``; KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()]) if m and m.group(2).upper() in _UNITS else 0
    if n <= 0:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return n


class CheckpointConfig(_Section):
    steps: int = Field(default=0, ge=0)  # 0: only final/
    keep_last: int | None = Field(default=3, gt=0)
    keep_best: str | None = None  # also keep the best checkpoint by this metric, e.g. eval/sts-dev/spearman_cosine
    max_shard_size: str = "5GB"  # per safetensors file (transformers' shards + index); ZeRO-3: rank 0 holds one

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)  # ValueError unless a positive size
        return v


class HealthConfig(_Section):
    max_bad_steps: int = Field(default=5, gt=0)  # NaN/inf loss or gradients in a row before aborting
    plateau_steps: int = Field(default=50, ge=0)  # steps after warm-up at ~ln(candidates) before warning; 0: off
    collapse_std: float = Field(default=1e-4, ge=0)  # embedding std across the batch below this: warning


class DistributedConfig(_Section):
    backend: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed_config: LocalPath | None = None
    timeout_s: int = Field(default=1800, gt=0)
    # our launchers (--nproc/--nnodes, Slurm): a node silent this long is lost (heartbeats on the
    # launchers' own connection, never the collectives'), and a rendezvous waits this long for
    # every node to join (docs/distributed.md, "Lost nodes")
    peer_timeout_s: float = Field(default=30.0, gt=0)
    join_timeout_s: float = Field(default=300.0, gt=0)
    bucket_mb: float = Field(default=25.0, gt=0)  # gradient all-reduce bucket size
    # deal each global batch's rows out so that every rank gets about as many characters of text
    # (no rank waits long for the one that drew the longest texts); same loss and gradients
    balance_ranks: bool = True


class WandbConfig(_Section):
    project: str = "dist-embed"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] | None = None  # None: online with an API key, else offline
    log_model: bool = False  # upload final/ as a model artifact


class LoggingConfig(_Section):
    wandb: WandbConfig | None = None  # absent: no W&B


class Config(_Section):
    output_dir: OutputPath
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    _datasets: list[DatasetConfig] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.distributed.backend == "deepspeed" and not self.distributed.deepspeed_config:
            raise ValueError("distributed.deepspeed_config is required when distributed.backend is deepspeed")
        # each dataset's loss, resolved here once: its own section, else the top-level one
        self._datasets = [ds if ds.loss is not None else ds.model_copy(update={"loss": self.loss})
                          for ds in self.data.datasets()]
        if self.data.hard_negatives is not None:
            self.data.hard_negatives.check(self._datasets)
        return self

    @property
    def datasets(self) -> list[DatasetConfig]:
        """Every training dataset, each with its effective ``loss`` (never None)."""
        return list(self._datasets)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def with_absolute_paths(self, base: Path) -> "Config":
        """This config with every local path (the fields typed ``LocalPath``) that exists under
        ``base`` made absolute, and ``output_dir`` absolute: for workers whose working directory is
        not the submitter's (Ray). Hub ids, URLs and ``package:`` paths stay as written."""
        return absolute_paths(self, Path(base))


