"""The whole pipeline on the synthetic world, in one command: `clocmllm demo --workdir DIR`.

Stages run as subprocesses of the `clocmllm` CLI (`python -m clocmllm ...`), so JAX and torch
never share a process (the DESIGN's rule), each stage's memory is returned when it ends, and
every stage is exactly what a user would type. Each finished stage leaves
`DIR/stages/<name>.json` (its timing and outputs); a rerun skips finished stages, so an
interrupted demo resumes where it stopped. A stage whose command is not built yet is
reported as such, with the issue that delivers it, and the stages that depend on it are
skipped: the report never shows a figure that was not measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clocmllm.cli import COMMANDS, command_module

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "scripts" / "recipes"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and budgets. `full` is tuned for ≤ 15 min on 2 cores, `quick` for ≤ 3 min."""

    name: str
    train_images: int
    eval_images: int
    image_size: int
    pretrain_steps: int
    pretrain_batch: int
    finetune_stage1_steps: int
    finetune_stage2_steps: int
    seed: int = 0
    recipes: tuple[str, ...] = ("clip", "cloc")


PLANS = {
    "full": DemoPlan("full", 4000, 300, 64, 1500, 64, 150, 1200),
    "quick": DemoPlan("quick", 400, 64, 64, 60, 32, 10, 30),
}


@dataclass
class StageResult:
    name: str
    status: str  # done | skipped | not_built | failed
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict)
    message: str = ""


class Demo:
    """Runs the stages in order, resuming finished ones, and writes the report."""

    def __init__(self, workdir: str | os.PathLike, plan: DemoPlan, log: Callable[[str], None] = print):
        self.dir = Path(workdir)
        self.plan = plan
        self.log = log
        self.results: dict[str, StageResult] = {}
        (self.dir / "stages").mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)

    # ---------------------------------------------------------------- stage plumbing
    def stage(self, name: str, command: str, needs: tuple[str, ...], body: Callable[[], dict]) -> StageResult:
        marker = self.dir / "stages" / f"{name}.json"
        if marker.exists():
            res = StageResult(**json.loads(marker.read_text()))
            if res.status == "done":
                self.log(f"[demo] {name}: already done ({res.seconds:.0f} s), skipping")
                self.results[name] = res
                return res
        missing = [n for n in needs if self.results.get(n, StageResult(n, "failed")).status != "done"]
        if command_module(command) is None:
            issue = COMMANDS[command][2]
            res = StageResult(name, "not_built", message=f"`clocmllm {command}` is not built yet (issue #{issue})")
        elif missing:
            res = StageResult(name, "skipped", message=f"needs {', '.join(missing)}, which did not finish")
        else:
            self.log(f"[demo] {name}: running")
            t0 = time.perf_counter()
            try:
                outputs = body()
                res = StageResult(name, "done", time.perf_counter() - t0, outputs)
            except StageFailed as err:
                res = StageResult(name, "failed", time.perf_counter() - t0, message=str(err))
        if res.status != "done":
            self.log(f"[demo] {name}: {res.status.replace('_', ' ')} — {res.message}")
        else:
            self.log(f"[demo] {name}: done in {res.seconds:.0f} s")
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(res), indent=2))
            os.replace(tmp, marker)
        self.results[name] = res
        return res

    def cli(self, name: str, *args: str) -> None:
        """Run `clocmllm <args>` as a subprocess; its output goes to the terminal and a log file."""
        cmd = [sys.executable, "-m", "clocmllm", *map(str, args)]
        self.log("[demo] $ clocmllm " + " ".join(map(str, args)))
        log_path = self.dir / "logs" / f"{name}.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            assert proc.stdout is not None
            for line in proc.stdout:
                log_file.write(line)
                sys.stdout.write(line)
                sys.stdout.flush()
            rc = proc.wait()
        if rc != 0:
            raise StageFailed(f"`clocmllm {' '.join(map(str, args))}` exited with {rc}; see {log_path}")


class StageFailed(RuntimeError):
    pass


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def run_demo(workdir: str | os.PathLike, quick: bool = False, recipes: tuple[str, ...] | None = None) -> dict:
    """Run every stage that exists; returns the report (also written to DIR/report.json)."""
    from clocmllm.demo_report import build_report, write_report

    plan = PLANS["quick" if quick else "full"]
    if recipes:
        plan = DemoPlan(**{**asdict(plan), "recipes": tuple(recipes)})
    demo = Demo(workdir, plan)
    t_start = time.perf_counter()
    world = demo.dir / "world"

    # ---------------------------------------------------------------- data
    demo.stage(
        "world",
        "world",
        (),
        lambda: (
            demo.cli(
                "world", "world", "--out", world, "--train", plan.train_images, "--eval", plan.eval_images,
                "--seed", plan.seed, "--image-size", plan.image_size,
            )
            or {"dir": str(world)}
        ),
    )

    # ---------------------------------------------------------------- encoders
    for recipe in plan.recipes:
        wd = demo.dir / f"pretrain_{recipe}"
        demo.stage(
            f"pretrain_{recipe}",
            "pretrain",
            ("world",),
            lambda recipe=recipe, wd=wd: (
                demo.cli(
                    f"pretrain_{recipe}", "pretrain", "--config", RECIPES / f"tiny_{recipe}.yaml", "--workdir", wd,
                    "--data", world, "--steps", plan.pretrain_steps,
                    "--set", f"batch_size={plan.pretrain_batch}", "--set", f"seed={plan.seed}",
                )
                or {"workdir": str(wd)}
            ),
        )
        ex = demo.dir / f"export_{recipe}"
        demo.stage(
            f"export_{recipe}",
            "export",
            (f"pretrain_{recipe}",),
            lambda recipe=recipe, wd=wd, ex=ex: (
                demo.cli(f"export_{recipe}", "export", "--checkpoint", wd, "--out", ex, "--force")
                or {"dir": str(ex), "report": read_json(ex / "export_report.json")}
            ),
        )
        ev = demo.dir / f"eval_encoder_{recipe}.json"
        demo.stage(
            f"eval_encoder_{recipe}",
            "eval",
            (f"pretrain_{recipe}",),
            lambda recipe=recipe, wd=wd, ev=ev: (
                demo.cli(
                    f"eval_encoder_{recipe}", "eval", "encoder", "--checkpoint", wd, "--data", world / "eval",
                    "--json", ev,
                )
                or {"metrics": read_json(ev)}
            ),
        )

    # ---------------------------------------------------------------- MLLM
    for recipe in plan.recipes:
        md = demo.dir / f"mllm_{recipe}"
        demo.stage(
            f"finetune_{recipe}",
            "finetune",
            (f"export_{recipe}",),
            lambda recipe=recipe, md=md: (
                demo.cli(
                    f"finetune_{recipe}", "finetune", "--config", RECIPES / "mllm_demo.yaml",
                    "--set", f"tower={demo.dir / f'export_{recipe}'}", "--set", f"data={world / 'train' / 'conversations.json'}",
                    "--set", f"output_dir={md}", "--set", f"stage1_steps={plan.finetune_stage1_steps}",
                    "--set", f"stage2_steps={plan.finetune_stage2_steps}", "--set", f"seed={plan.seed}",
                )
                or {"dir": str(md / "final")}
            ),
        )
        mv = demo.dir / f"eval_mllm_{recipe}.json"
        demo.stage(
            f"eval_mllm_{recipe}",
            "eval",
            (f"finetune_{recipe}",),
            lambda recipe=recipe, md=md, mv=mv: (
                demo.cli(
                    f"eval_mllm_{recipe}", "eval", "mllm", "--model", md / "final",
                    "--data", world / "eval" / "conversations.json", "--json", mv, "--examples", demo.dir / f"examples_{recipe}",
                )
                or {"metrics": read_json(mv)}
            ),
        )

    # ---------------------------------------------------------------- report
    total = time.perf_counter() - t_start
    report = build_report(demo.results, plan, total)
    write_report(demo.dir, report, demo.results)
    return report
