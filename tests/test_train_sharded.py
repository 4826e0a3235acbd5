"""FSDP2 and DeepSpeed ZeRO-2/3 on 2 CPU processes (gloo) with the shipped configs: final weights
equal DDP's with the same global batch, a sharded checkpoint resumes exactly, model/ loads.

CPU processes need tests/cpu_engines_shim.py: accelerate 1.15 runs neither engine on CPU
processes (docs/scale-out.md). Everything else is the shipped config and edlm's own loop.
DeepSpeed is not an edlm dependency: its tests skip unless `import deepspeed` works."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from edlm import DiffusionLM

ROOT = Path(__file__).resolve().parents[1]
TEXT = "\n\n".join(f"the {w} jumps over the lazy dog {i % 7} times." for i, w in
                   enumerate(["fox", "cat", "cow", "hen"] * 30))
ARGS = ["--block-size", "4", "--seq-len", "32", "--batch-size", "2", "--steps", "4", "--lr", "3e-3",
        "--warmup-steps", "1", "--save-every", "2", "--log-every", "1", "--no-progress"]
SHIM = [str(ROOT / "tests" / "cpu_engines_shim.py")]


def launch(config_args, entry, model, data, out, *extra, port, cpu=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *config_args, "--main_process_port",
                        str(port), *entry, "train", str(model), "--data", str(data), "--out", str(out), *ARGS, *extra],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def weights(model_dir):
    return load_file(str(Path(model_dir) / "model.safetensors"))


def diff(a, b):
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def ddp(tiny_ar_dir, tmp_path_factory):
    """The reference: plain DDP, 2 processes, the same global batch."""
    d = tmp_path_factory.mktemp("ddp")
    (d / "train.txt").write_text(TEXT)
    launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"], ["-m", "edlm.cli"], tiny_ar_dir, d / "train.txt", d / "run", port=29532)
    return d


def config_for_2_cpu_processes(name, tmp_path):
    config = tmp_path / name
    config.write_text((ROOT / "configs" / name).read_text().replace("num_processes: 8", "num_processes: 2")
                      .replace("mixed_precision: bf16", "mixed_precision: 'no'"))
    return ["--config_file", str(config)]


def equals_ddp_and_resumes_exactly(engine, config, ddp, tiny_ar_dir, tmp_path, port, cpu):
    data = ddp / "train.txt"
    run = launch(config, SHIM, tiny_ar_dir, data, tmp_path / "run", port=port, cpu=cpu)
    assert f"on 2 process(es) (DistributedType.{engine})" in run.stdout
    assert diff(weights(tmp_path / "run" / "model"), weights(ddp / "run" / "model")) <= 1e-5
    assert DiffusionLM.from_pretrained(tmp_path / "run" / "model").config.block_size == 4
    # resume from the sharded step-2 checkpoint: the same weights as the unbroken run
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000004")
    shutil.rmtree(tmp_path / "resumed" / "model")
    r = launch(config, SHIM, tiny_ar_dir, data, tmp_path / "resumed", "--resume", port=port + 1, cpu=cpu)
    assert "at step 2" in r.stdout
    assert diff(weights(tmp_path / "resumed" / "model"), weights(tmp_path / "run" / "model")) <= 1e-6
    return tmp_path / "run" / "checkpoints" / "step-00000002" / "state"


@pytest.mark.slow
def test_fsdp2_two_processes_equals_ddp_and_resumes_exactly(ddp, tiny_ar_dir, tmp_path):
    config = config_for_2_cpu_processes("fsdp.yaml", tmp_path)
    assert "fsdp_version: 2" in Path(config[1]).read_text()
    state = equals_ddp_and_resumes_exactly("FSDP", config, ddp, tiny_ar_dir, tmp_path, 29533, cpu=True)
    assert (state / "pytorch_model_fsdp_0").is_dir() and (state / "optimizer_0").is_dir()  # sharded


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes_equals_ddp_and_resumes_exactly(ddp, tiny_ar_dir, tmp_path, stage):
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional: pip install deepspeed")
    config = config_for_2_cpu_processes(f"deepspeed-zero{stage}.yaml", tmp_path)
    state = equals_ddp_and_resumes_exactly("DEEPSPEED", config, ddp, tiny_ar_dir, tmp_path, 29535 + 2 * stage,
                                           cpu=False)
    shards = sorted(p.name for p in (state / "pytorch_model").iterdir())
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards  # each process wrote its partition
