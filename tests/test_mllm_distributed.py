"""Two CPU processes: accelerate DDP gives the single-process update; one DeepSpeed ZeRO-2 step.

Both compare against `finetune` run in this process with the same global batch (4 samples):
2 processes x 2 per process. The data has answers of equal token counts (all grounding), so
the mean of per-process token means is the global token mean and the updates must agree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import yaml

pytest.importorskip("accelerate")

from safetensors.torch import load_file

from clocmllm.mllm import tiny
from clocmllm.mllm.config import DEFAULTS, merge
from clocmllm.mllm.train import finetune

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mllm_dist")
    tower = tiny.make_tower_folder(root / "tower")
    data = tiny.make_conversations(root / "data", n=4, tasks=("grounding",))
    return root, tower, data


def _recipe(tower, data, out, **train) -> dict:
    return {
        "model": {"tower": {"path": str(tower)}, "regions": "shared", "llm": {"config": tiny.llm_config()}},
        "data": {"train": str(data), "max_length": 128},
        "train": {
            "stage": 2,
            "max_steps": 1,
            "shuffle": False,
            "warmup_ratio": 0.0,
            "plot": False,
            "output_dir": str(out),
            **train,
        },
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd: list[str], recipe: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.run(
        [*cmd, "-m", "clocmllm.cli", "finetune", "--config", str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


def _assert_same_weights(a_dir: Path, b_dir: Path, atol: float) -> float:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst
    return worst


def _moved(before_dir: Path, after_dir: Path) -> float:
    a, b = load_file(before_dir / "model.safetensors"), load_file(after_dir / "model.safetensors")
    return max((a[k] - b[k]).abs().max().item() for k in a if k.startswith("llm."))


def test_ddp_two_processes_equal_one_process(setup):
    root, tower, data = setup
    single = finetune(
        merge(DEFAULTS, _recipe(tower, data, root / "single", optimizer="sgd", lr=0.5, batch_size=4))
    )
    zero = finetune(
        merge(DEFAULTS, _recipe(tower, data, root / "zero", optimizer="sgd", lr=0.0, batch_size=4))
    )
    assert _moved(zero, single) > 1e-3  # the step really changes the LLM
    recipe = _recipe(tower, data, root / "ddp", optimizer="sgd", lr=0.5, batch_size=2)
    _launch(
        [
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--main_process_port",
            str(free_port()),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ],
        recipe,
        root / "ddp.yaml",
    )
    _assert_same_weights(single, root / "ddp" / "model", atol=1e-6)
    loss_single = json.loads((root / "single" / "metrics.jsonl").read_text())["loss"]
    loss_ddp = json.loads((root / "ddp" / "metrics.jsonl").read_text())["loss"]
    assert abs(loss_single - loss_ddp) < 1e-5


def test_deepspeed_zero2_step_on_two_processes(setup):
    """One ZeRO-2 step (partitioned gradients and optimizer state) equals the 1-process step.

    The shipped zero2.json's ZeRO settings are used with its optimizer section removed, so the
    client SGD optimizer runs inside ZeRO: SGD makes the comparison exact, where Adam's first
    step (~lr*sign(grad)) would flip on gradients near eps.
    """
    root, tower, data = setup
    if shutil.which("torchrun", path=str(BIN)) is None:
        pytest.skip("torchrun not installed")
    ds = json.loads((REPO / "scripts" / "deepspeed" / "zero2.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["optimizer"]["params"]["torch_adam"] is True
    del ds["optimizer"]
    ds["zero_allow_untested_optimizer"] = True
    (root / "zero2_sgd.json").write_text(json.dumps(ds))
    single = root / "single" / "model"
    if not single.is_dir():
        single = finetune(
            merge(DEFAULTS, _recipe(tower, data, root / "single", optimizer="sgd", lr=0.5, batch_size=4))
        )
    recipe = _recipe(
        tower,
        data,
        root / "ds",
        optimizer="sgd",
        lr=0.5,
        batch_size=2,
        deepspeed=str(root / "zero2_sgd.json"),
    )
    _launch(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
        ],
        recipe,
        root / "ds.yaml",
    )
    _assert_same_weights(single, root / "ds" / "model", atol=1e-6)
    loss_single = json.loads((root / "single" / "metrics.jsonl").read_text())["loss"]
    loss_ds = json.loads((root / "ds" / "metrics.jsonl").read_text())["loss"]
    assert abs(loss_single - loss_ds) < 1e-5
