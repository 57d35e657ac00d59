"""Weights & Biases on rank 0: resumable run, metrics, health alerts, the model as an artifact.

The API key is only ever read by wandb itself (WANDB_API_KEY or ~/.netrc); nothing here copies it
into logs, configs or model cards. Without a key and without an explicit mode the run is offline and
the log says where its files are (``wandb sync DIR`` uploads them later).
"""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"
TRAIN_KEYS = ("loss", "lr", "grad_norm", "samples_per_second", "tokens_per_second", "padding_ratio")


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def system_info(world_size: int) -> dict:
    import torch

    info = {"world_size": world_size, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_type=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpus_per_node=torch.cuda.device_count())
    return info


class WandbRun:
    def __init__(self, cfg, out_dir: Path, resolved_config: dict, world_size: int, skip_until: int = -1):
        import wandb

        self.cfg = cfg
        self.skip_until = skip_until  # steps a stopped run already logged (redone identically after a resume)
        mode = cfg.mode
        if mode is None:
            mode = "online" if _has_api_key() else "offline"
            if mode == "offline":
                log.info("W&B: no API key found; logging offline")
        id_file = out_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        # W&B's files: where the user's WANDB_DIR says, else beside the run's other outputs
        files = os.environ.get("WANDB_DIR") or str(out_dir)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, group=cfg.group,
                              tags=list(cfg.tags) or None, mode=mode, dir=files, id=run_id, resume="allow",
                              config={**resolved_config, "system": system_info(world_size)})
        id_file.write_text(run_id + "\n")
        self.mode = mode
        if mode == "offline":
            log.info("W&B run files: %s (upload later with: wandb sync %s)", self.run.dir and Path(self.run.dir).parent,
                     Path(self.run.dir).parent)
        self._wandb = wandb

    def log(self, record: dict) -> None:
        step = record.get("step")
        if step is not None and step <= self.skip_until and "event" not in record:
            return
        if "event" in record:
            self.run.alert(title=f"dist-embed: {record['event']}", text=record["message"],
                           level=self._wandb.AlertLevel.WARN)
            data = {k: v for k, v in record.items() if k.startswith("health/")}
        else:
            data = {}
            for k, v in record.items():
                if k in ("step", "epoch", "final"):
                    continue
                data[k if "/" in k else f"train/{k}"] = v
            if "epoch" in record:
                data["train/epoch"] = record["epoch"]
        data = {k: v for k, v in data.items() if v is not None}
        if data:
            self.run.log(data, step=step)

    def log_model(self, path: Path) -> None:
        if not self.cfg.log_model:
            return
        art = self._wandb.Artifact(name=f"model-{self.run.id}", type="model")
        art.add_dir(str(path))
        self.run.log_artifact(art, aliases=["final", "latest"])

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
