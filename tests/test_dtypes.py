"""A starting checkpoint in any dtype trains with fp32 weights: bf16, fp16 and fp32 copies of the same
values give the same losses and weights at the same step (all-reduce backend, LoRA, DeepSpeed);
checkpoints and final/ store the weights in model.save_dtype (auto: the starting checkpoint's), and
a resume from a half-precision checkpoint continues from the exact fp32 weights."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, quick_triplets, tiny_config, train_losses, write_jsonl

pytestmark = pytest.mark.slow
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def copies(tmp_path_factory, tiny_model):
    """The tiny model with values that bf16 and fp16 both hold exactly, stored three times as
    transformers ships such checkpoints: weights in the dtype, config.json's ``dtype`` saying so."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("dtypes")
    weights = load_file(str(tiny_model / "model.safetensors"))
    exact = {}
    for key, value in weights.items():
        v = value.to(torch.bfloat16).float()
        v[v.abs() < 2 ** -14] = 0  # below fp16's normal range bf16's bits would not all fit
        exact[key] = v
    for name, dtype in DTYPES.items():
        out = root / name
        shutil.copytree(tiny_model, out)
        save_file({k: v.to(dtype) for k, v in exact.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        conf = json.loads((out / "config.json").read_text())
        conf["dtype"] = str(dtype).removeprefix("torch.")
        (out / "config.json").write_text(json.dumps(conf))
        stored = load_file(str(out / "model.safetensors"))
        assert all(torch.equal(stored[k].float(), exact[k]) for k in exact)
    return root


def train_in_one_process(runs: list[list[str]]) -> None:
    """Single-process trainings through the CLI's own main, one after another in one interpreter
    (the imports are paid once)."""
    code = ("import json, sys\nfrom launch.cli import main\n"
            "for args in json.loads(sys.argv[1]):\n    code = main(args)\n    assert code == 0, (args, code)\n")
    r = subprocess.run([sys.executable, "-c", code, json.dumps([[str(a) for a in run] for run in runs])],
                       capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def master(run, step: int):
    """The fp32 weights a checkpoint resumes from: beside a half-precision model, or the model itself."""
    state = run / "checkpoints" / f"step-{step}"
    kept = state / "training_state" / "master_weights.safetensors"
    return weights(kept if kept.exists() else state / "model.safetensors")


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst == 0.0, worst


def test_half_precision_checkpoints_train_as_fp32_and_save_in_their_dtype(tmp_path, copies):
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(96))
    cfg = tiny_config(tmp_path, copies / "fp32", data, model={"dropout": None}, checkpoint={"steps": 2},
                      training={"max_steps": 4})
    lora = ["model.lora.r=4", "model.lora.target_modules=[query,value]", "training.lr=1e-2"]
    runs = [["train", cfg, f"output_dir={tmp_path / name}", f"model.name_or_path={copies / name}"] for name in DTYPES]
    runs += [["train", cfg, f"output_dir={tmp_path / ('lora-' + name)}", f"model.name_or_path={copies / name}", *lora]
             for name in DTYPES]
    # a resume from the bf16 run's half-precision checkpoint, written out in fp32 this time
    runs.append(["train", cfg, f"output_dir={tmp_path / 'resumed'}", f"model.name_or_path={copies / 'bf16'}",
                 "model.save_dtype=fp32", "--resume", tmp_path / "bf16" / "checkpoints" / "step-2"])
    train_in_one_process(runs)
    for kind in ("", "lora-"):
        ref = tmp_path / f"{kind}fp32"
        for name, dtype in DTYPES.items():
            run = tmp_path / f"{kind}{name}"
            assert train_losses(run) == train_losses(ref), (kind, name)
            final = weights(run / "final" / "model.safetensors")
            assert {v.dtype for v in final.values()} == {dtype}, (kind, name)  # save_dtype auto
            assert json.loads((run / "final" / "config.json").read_text())["dtype"] == str(dtype)[6:]
            assert_same(final, {k: v.to(dtype) for k, v in weights(ref / "final" / "model.safetensors").items()})
            if kind:  # LoRA: the adapters, trained in fp32 over an fp32 base
                state = run / "checkpoints" / "step-2" / "training_state"
                assert_same(weights(state / "adapter.safetensors"),
                            weights(ref / "checkpoints" / "step-2" / "training_state" / "adapter.safetensors"))
            else:
                assert_same(master(run, 2), master(ref, 2))
    # the resumed run went on from the fp32 weights, not the bf16 ones stored in its model files
    assert_same(weights(tmp_path / "resumed" / "final" / "model.safetensors"),
                weights(tmp_path / "fp32" / "final" / "model.safetensors"))
    trainer = json.loads((tmp_path / "bf16" / "checkpoints" / "step-2" / "training_state" / "trainer.json").read_text())
    assert trainer["save_dtype"] == "bfloat16"


def test_deepspeed_trains_half_precision_checkpoints_as_fp32(tmp_path, copies):
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(64))
    cfg = tiny_config(tmp_path, copies / "fp32", data, model={"dropout": None}, training={"max_steps": 3},
                      distributed={"backend": "deepspeed",
                                   "deepspeed_config": str(REPO / "configs" / "deepspeed" / "zero2.json")})
    # DeepSpeed keeps process-wide state (one Accelerator per process): a process each, side by side
    procs = [subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(cfg), f"output_dir={tmp_path / name}",
                               f"model.name_or_path={copies / name}", "model.save_dtype=fp32"], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for name in DTYPES]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
    ref = weights(tmp_path / "fp32" / "final" / "model.safetensors")
    for name in ("bf16", "fp16"):
        assert train_losses(tmp_path / name) == train_losses(tmp_path / "fp32"), name
        assert_same(weights(tmp_path / name / "final" / "model.safetensors"), ref)


def test_a_half_precision_model_loads_as_fp32_for_evaluation(copies):
    """``dist-embed eval``, mining and guide models load through the same path: fp32 weights (CPU
    matmuls in bf16 are emulated, ~100x slower), the same embeddings as the fp32 copy."""
    from dist_embed.model.encoder import Encoder

    texts = ["A man is playing a guitar.", "Two dogs run through the snow."]
    ref = Encoder.from_pretrained(str(copies / "fp32")).encode(texts)
    for name, dtype in DTYPES.items():
        enc = Encoder.from_pretrained(str(copies / name))
        assert {p.dtype for p in enc.parameters()} == {torch.float32} and enc.source_dtype == dtype
        assert (enc.encode(texts) == ref).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_half_precision_checkpoints_train_under_autocast_on_a_gpu(tmp_path, copies):
    """An fp16 checkpoint with training.precision=fp16 stopped at step 1 ("Attempting to unscale FP16
    gradients": its weights were fp16); with fp32 weights it trains as the fp32 copy does, bf16 too."""
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(64))
    cfg = tiny_config(tmp_path, copies / "fp32", data, training={"max_steps": 3})
    runs = [["train", cfg, f"output_dir={tmp_path / f'{p}-{name}'}", f"model.name_or_path={copies / name}",
             f"training.precision={p}"] for p, names in (("fp16", ("fp16", "fp32")), ("bf16", ("bf16", "fp32")))
            for name in names]
    train_in_one_process(runs)
    for p, name in (("fp16", "fp16"), ("bf16", "bf16")):
        assert train_losses(tmp_path / f"{p}-{name}") == train_losses(tmp_path / f"{p}-fp32"), p
