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
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from clocmllm.cli import COMMANDS, command_module

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "scripts" / "recipes"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and budgets. `full` aims at <= 15 min on 2 cores, `quick` at <= 3 min.

    Measured (docs/demo.md, "Time budget"): `full` 10 min 27 s and `quick` 1 min 06 s on an
    idle 2-core box (18.5 min for `full` on the shared box at load 6-8, before the parallel
    MLLM chains). The full plan's choices and what they bought are in
    docs/demo.md's tuning log: 1500 pretraining steps at lr 2e-3 (demo_{clip,cloc}.yaml),
    a box proposer per tower, then 100 + 2000 fine-tuning steps of a 2-layer Llama from scratch
    on digit tokens, reading the tower's last block (pooled 2x2) and naming proposals.

    Both recipes of a plan get exactly the same budget (steps, batch, data, seed): the
    comparison is CLOC's losses against CLIP's, nothing else.
    """

    name: str
    train_images: int
    eval_images: int
    image_size: int
    pretrain_steps: int
    pretrain_batch: int
    finetune_stage1_steps: int
    finetune_stage2_steps: int
    finetune_batch: int = 16
    finetune_stage1_lr: float = 2e-3
    # stage 2 at half stage 1's lr: without dual grounding (demo_mllm.yaml) 0.64/0.65 grounding
    # Acc@0.5 at 1e-3 against 0.37/0.40 at 2e-3 (seeds 0/1, docs/demo.md fifth pass, r3-r6)
    finetune_stage2_lr: float = 1e-3
    # "digits": clocmllm/demo_tokenizer.py (numbers as digit tokens, for an LLM from scratch);
    # "words": the MLLM's default word-level tokenizer (one token per grid number).
    mllm_tokenizer: str = "digits"
    # "proposals": proposal grounding (clocmllm/mllm/proposer.py): a box proposer is trained on
    # each frozen tower (`clocmllm proposer`, inside the finetune stage) and the MLLM grounds by
    # naming one of its K candidates; "text": the LLM writes the box coordinates itself
    # (grounding Acc@0.5 0.01-0.05 in every variant tried, docs/demo.md).
    grounding: str = "proposals"
    proposer_steps: int = 4000
    # MLLM eval samples (None: the whole eval split); encoder eval uses every eval image.
    eval_mllm_limit: int | None = None
    num_examples: int = 6
    seed: int = 0
    recipes: tuple[str, ...] = ("clip", "cloc")
    # Run the recipes' MLLM chains (finetune, then eval mllm) side by side: they are
    # single-threaded torch (TORCH_ENV), so on 2 idle cores two of them take the time of one.
    parallel_mllm: bool = True

    def __post_init__(self) -> None:
        """Refuse a bad plan before minutes of pretraining, not in the stage that reads it."""
        for name, allowed in (("mllm_tokenizer", ("digits", "words")), ("grounding", ("proposals", "text"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"plan.{name}: expected one of {allowed}, got {getattr(self, name)!r}")


PLANS = {
    # stage 2: 2000 steps, paid for by pooling the image tokens 2x2 (demo_mllm.yaml); docs/demo.md
    # fifth pass: 1500 -> 0.45/0.57, 2000 -> 0.60/0.65, 2000 pooled -> 0.64/0.61 (seeds 0/1)
    "full": DemoPlan("full", 4000, 300, 64, 1500, 64, 100, 2000),
    "quick": DemoPlan(
        "quick", 200, 32, 64, 30, 16, 5, 30, finetune_batch=8, eval_mllm_limit=32, proposer_steps=100
    ),
}

# Torch stages: tiny matmuls run far faster on one thread than on two contending OpenMP
# threads on a loaded 2-core box (docs/mllm.md measures ~40x); JAX keeps its own pool.
TORCH_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class StageResult:
    name: str
    status: str  # done | skipped | not_built | failed
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict)
    message: str = ""
    # CPU seconds (user + sys) of the stage's subprocesses: on the shared, loaded box wall time
    # says more about the neighbours than about the demo, CPU time much less (docs/demo.md).
    cpu_seconds: float = 0.0


class Demo:
    """Runs the stages in order, resuming finished ones, and writes the report."""

    def __init__(self, workdir: str | os.PathLike, plan: DemoPlan, log: Callable[[str], None] = print):
        self.dir = Path(workdir)
        self.plan = plan
        self.log = log
        self.results: dict[str, StageResult] = {}
        self._cpu = threading.local()  # CPU seconds of the current thread's stage subprocesses
        self._tokenizer_lock = threading.Lock()
        # One persistent XLA compilation cache for the JAX stages (pretrain, export, eval
        # encoder) unless the caller set one: reruns and resumes skip most compiles
        # (docs/demo.md measures it). Torch stages ignore the variable.
        self.env = {"PYTHONUNBUFFERED": "1"}
        if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            self.env["JAX_COMPILATION_CACHE_DIR"] = str(self.dir.resolve() / "jax_cache")
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
            res = StageResult(
                name, "not_built", message=f"`clocmllm {command}` is not built yet (issue #{issue})"
            )
        elif missing:
            res = StageResult(name, "skipped", message=f"needs {', '.join(missing)}, which did not finish")
        else:
            self.log(f"[demo] {name}: running")
            t0, self._cpu.seconds = time.perf_counter(), 0.0
            try:
                outputs = body()
                res = StageResult(name, "done", time.perf_counter() - t0, outputs)
            except StageFailed as err:
                res = StageResult(name, "failed", time.perf_counter() - t0, message=str(err))
            res.cpu_seconds = self._cpu.seconds
        if res.status != "done":
            self.log(f"[demo] {name}: {res.status.replace('_', ' ')} — {res.message}")
        else:
            self.log(f"[demo] {name}: done in {res.seconds:.0f} s ({res.cpu_seconds:.0f} s CPU)")
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(res), indent=2))
            os.replace(tmp, marker)
        self.results[name] = res
        return res

    def cli(self, name: str, *args: object, env: dict[str, str] | None = None, append: bool = False) -> None:
        """Run `clocmllm <args>` as a subprocess; its output goes to the terminal and a log file."""
        cmd = [sys.executable, "-m", "clocmllm", *map(str, args)]
        self.log("[demo] $ clocmllm " + " ".join(map(str, args)))
        log_path = self.dir / "logs" / f"{name}.log"
        full_env = {**os.environ, **self.env, **(env or {})}
        with open(log_path, "a" if append else "w") as log_file:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=full_env
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                log_file.write(line)
                sys.stdout.write(line)
                sys.stdout.flush()
            rc, cpu = wait_with_cpu(proc)
        self._cpu.seconds = getattr(self._cpu, "seconds", 0.0) + cpu
        if rc != 0:
            raise StageFailed(f"`clocmllm {' '.join(map(str, args))}` exited with {rc}; see {log_path}")


class StageFailed(RuntimeError):
    pass


def wait_with_cpu(proc: subprocess.Popen) -> tuple[int, float]:
    """Reap `proc` -> (exit code, its user + system CPU seconds, its own children included).

    wait4 gives the usage of that one child, so stages running side by side on threads
    (parallel MLLM chains) do not count each other's CPU, as RUSAGE_CHILDREN deltas would.
    """
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen never waits again
    return proc.returncode, usage.ru_utime + usage.ru_stime


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def max_abs_diff(report: dict) -> float:
    """The export's worst JAX-vs-PyTorch parity difference (fp32), over every checked output."""
    return float(max(report["parity"]["diffs"].values()))


def run_demo(
    workdir: str | os.PathLike,
    quick: bool = False,
    recipes: tuple[str, ...] | None = None,
    overrides: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every stage that exists; returns the report (also written to DIR/report.json).

    `overrides` replaces plan fields (e.g. `{"pretrain_steps": 5}`): the test suite runs the
    quick plan smaller still through it; the CLI does not expose it.
    """
    from clocmllm.demo_report import build_report, write_report

    plan = PLANS["quick" if quick else "full"]
    changes = dict(overrides or {})
    if recipes:
        changes["recipes"] = tuple(recipes)
    if changes:
        plan = replace(plan, **changes)
    demo = Demo(workdir, plan, log=log)
    t_start = time.perf_counter()
    world = demo.dir / "world"

    # ---------------------------------------------------------------- data
    demo.stage(
        "world",
        "world",
        (),
        lambda: (
            demo.cli(
                "world",
                "world",
                "--out",
                world,
                "--train",
                plan.train_images,
                "--eval",
                plan.eval_images,
                "--seed",
                plan.seed,
                "--image-size",
                plan.image_size,
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
                    f"pretrain_{recipe}",
                    "pretrain",
                    "--config",
                    RECIPES / f"demo_{recipe}.yaml",
                    "--workdir",
                    wd,
                    "--data",
                    world,
                    "--steps",
                    plan.pretrain_steps,
                    "--set",
                    f"data.batch_size={plan.pretrain_batch}",
                    "--set",
                    f"seed={plan.seed}",
                    "--set",
                    f"model.image_size={plan.image_size}",
                )
                or {"workdir": str(wd)}
            ),
        )
        ex = demo.dir / f"export_{recipe}"
        demo.stage(
            f"export_{recipe}",
            "export",
            (f"pretrain_{recipe}",),
            lambda wd=wd, ex=ex, recipe=recipe: (
                demo.cli(
                    f"export_{recipe}", "export", "--checkpoint", wd, "--out", ex, "--force", env=TORCH_ENV
                )
                or {
                    "dir": str(ex),
                    "report": {"max_abs_diff": max_abs_diff(read_json(ex / "export_report.json"))},
                }
            ),
        )
        ev = demo.dir / f"eval_encoder_{recipe}.json"
        demo.stage(
            f"eval_encoder_{recipe}",
            "eval",
            (f"pretrain_{recipe}",),
            lambda recipe=recipe, wd=wd, ev=ev: (
                demo.cli(
                    f"eval_encoder_{recipe}",
                    "eval",
                    "encoder",
                    "--checkpoint",
                    wd,
                    "--data",
                    world,
                    "--split",
                    "eval",
                    "--json",
                    ev,
                )
                or {"metrics": read_json(ev)}
            ),
        )

    # ---------------------------------------------------------------- MLLM
    def mllm_chain(recipe: str) -> None:
        md = demo.dir / f"mllm_{recipe}"
        demo.stage(
            f"finetune_{recipe}",
            "finetune",
            (f"export_{recipe}",),
            lambda recipe=recipe, md=md: finetune_two_stages(demo, recipe, md, world),
        )
        mv = demo.dir / f"eval_mllm_{recipe}.json"
        limit = () if plan.eval_mllm_limit is None else ("--limit", plan.eval_mllm_limit)
        demo.stage(
            f"eval_mllm_{recipe}",
            "eval",
            (f"finetune_{recipe}",),
            lambda recipe=recipe, md=md, mv=mv, limit=limit: (
                demo.cli(
                    f"eval_mllm_{recipe}",
                    "eval",
                    "mllm",
                    "--model",
                    md / "stage2" / "model",
                    "--data",
                    world / "eval" / "conversations.json",
                    "--json",
                    mv,
                    "--examples",
                    demo.dir / f"examples_{recipe}",
                    "--num-examples",
                    plan.num_examples,
                    "--predictions",
                    demo.dir / f"predictions_{recipe}.jsonl",
                    *limit,
                    env=TORCH_ENV,
                )
                or {"metrics": read_json(mv)}
            ),
        )

    if plan.parallel_mllm and len(plan.recipes) > 1:
        with ThreadPoolExecutor(max_workers=len(plan.recipes)) as pool:
            list(pool.map(mllm_chain, plan.recipes))  # list(): re-raise a thread's error here
    else:
        for recipe in plan.recipes:
            mllm_chain(recipe)
    # the report lists stages in plan order, whichever parallel chain finished first
    chains = [f"{kind}_{r}" for r in plan.recipes for kind in ("finetune", "eval_mllm")]
    demo.results = {
        **{n: res for n, res in demo.results.items() if n not in chains},
        **{n: demo.results[n] for n in chains if n in demo.results},
    }

    # ---------------------------------------------------------------- report
    report = build_report(demo.results, plan, time.perf_counter() - t_start)
    write_report(demo.dir, report, demo.results)
    return report


def finetune_two_stages(demo: Demo, recipe: str, md: Path, world: Path) -> dict:
    """LLaVA's two stages: 1 trains the connector only (alignment), 2 the connector and LLM.

    Both stages read the same world conversations (the world has no separate caption set);
    stage 1 is short, so it mostly aligns the connector before the LLM starts to move.
    """
    plan = demo.plan
    tokenizer: tuple[str, ...] = ()
    if plan.mllm_tokenizer == "digits":
        from clocmllm.demo_tokenizer import write_digit_tokenizer

        path = demo.dir / "tokenizer_digits"
        with demo._tokenizer_lock:  # the recipes' chains may run side by side
            if not (path / "tokenizer.json").exists():
                write_digit_tokenizer(world / "train" / "conversations.json", path)
        tokenizer = ("--set", f"model.tokenizer.path={path}")
    proposer: tuple[str, ...] = ()
    outputs: dict = {}
    if plan.grounding == "proposals":
        demo.cli(
            f"finetune_{recipe}", "proposer", "--tower", demo.dir / f"export_{recipe}",
            "--data", world / "train" / "regions.jsonl", "--eval-data", world / "eval" / "regions.jsonl",
            "--out", md / "proposer", "--steps", plan.proposer_steps, "--seed", plan.seed, "--quiet",
            env=TORCH_ENV,
        )  # fmt: skip
        proposer = ("--set", f"model.proposer={md / 'proposer'}")
        outputs["proposer"] = read_json(md / "proposer" / "proposer_report.json")
    common = (
        "--config", RECIPES / "demo_mllm.yaml",
        "--set", f"data.train={world / 'train' / 'conversations.json'}",
        "--set", f"train.seed={plan.seed}", "--set", f"train.batch_size={plan.finetune_batch}",
    )  # fmt: skip
    demo.cli(
        f"finetune_{recipe}", "finetune", *common,
        "--set", f"model.tower.path={demo.dir / f'export_{recipe}'}", *tokenizer, *proposer,
        "--set", "train.stage=1", "--set", f"train.max_steps={plan.finetune_stage1_steps}",
        "--set", f"train.lr={plan.finetune_stage1_lr}",
        "--set", f"train.output_dir={md / 'stage1'}",
        env=TORCH_ENV, append=bool(proposer),
    )  # fmt: skip
    demo.cli(
        f"finetune_{recipe}", "finetune", *common,
        "--set", f"model.init_from={md / 'stage1' / 'model'}",
        "--set", "train.stage=2", "--set", f"train.max_steps={plan.finetune_stage2_steps}",
        "--set", f"train.lr={plan.finetune_stage2_lr}",
        "--set", f"train.output_dir={md / 'stage2'}",
        env=TORCH_ENV, append=True,
    )  # fmt: skip
    return {"dir": str(md / "stage2" / "model"), **outputs}
