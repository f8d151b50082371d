"""The demo's report: `report.json` (schema in docs/demo.md), `report.md`, and PNG figures.

Only measured figures appear; a metric whose stage did not run is `null`, and each target
records its value, its threshold and whether it was met (`null` when it could not be judged).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENCODER_KEYS = ("image_text_r1", "region_retrieval_r1", "region_retrieval_r10", "region_cls_acc")
MLLM_KEYS = ("grounding_acc50", "referring_acc")
PROPOSAL_KEY = "proposal_recall50"  # proposal grounding: eval objects the K proposals cover


def _metric(results: dict, stage: str, key: str):
    res = results.get(stage)
    if res is None or res.status != "done":
        return None
    value = res.outputs.get("metrics", {}).get(key)
    return None if value is None else float(value)


def _seconds(results: dict, *stages: str, attr: str = "seconds") -> float | None:
    done = [getattr(results[s], attr) for s in stages if s in results and results[s].status == "done"]
    return round(sum(done), 1) if done else None


def _stage_times(results: dict, recipes: list[str], attr: str) -> dict[str, float | None]:
    """Stage times grouped as report.json's `timings_s` / `cpu_s`, plus their total."""
    times = {
        "world": _seconds(results, "world", attr=attr),
        **{f"pretrain_{r}": _seconds(results, f"pretrain_{r}", attr=attr) for r in recipes},
        "export": _seconds(results, *[f"export_{r}" for r in recipes], attr=attr),
        **{f"finetune_{r}": _seconds(results, f"finetune_{r}", attr=attr) for r in recipes},
        "eval": _seconds(
            results, *[f"eval_encoder_{r}" for r in recipes], *[f"eval_mllm_{r}" for r in recipes], attr=attr
        ),
    }
    times["total"] = round(sum(v for v in times.values() if v is not None), 1)
    return times


def build_report(results: dict, plan, wall_seconds: float) -> dict:
    recipes = list(plan.recipes)
    encoders = {r: {k: _metric(results, f"eval_encoder_{r}", k) for k in ENCODER_KEYS} for r in recipes}
    mllm = {r: {k: _metric(results, f"eval_mllm_{r}", k) for k in MLLM_KEYS} for r in recipes}
    for r in recipes:  # proposal grounding: how many eval objects the K proposals cover (IoU >= 0.5)
        res = results.get(f"finetune_{r}")
        proposer = res.outputs.get("proposer") if res is not None and res.status == "done" else None
        mllm[r][PROPOSAL_KEY] = (proposer or {}).get("eval", {}).get("recall50")
    export = {}
    for r in recipes:
        res = results.get(f"export_{r}")
        diff = res.outputs.get("report", {}).get("max_abs_diff") if res and res.status == "done" else None
        export[r] = {"max_abs_diff": diff}

    clip_r1, cloc_r1 = (
        encoders.get("clip", {}).get("region_retrieval_r1"),
        encoders.get("cloc", {}).get("region_retrieval_r1"),
    )
    gain = None if clip_r1 is None or cloc_r1 is None else round(100 * (cloc_r1 - clip_r1), 2)
    g_cloc, g_clip = mllm.get("cloc", {}).get("grounding_acc50"), mllm.get("clip", {}).get("grounding_acc50")
    targets = {
        "cloc_region_r1_gain_points": {
            "value": gain,
            "threshold": 15.0,
            "met": None if gain is None else gain >= 15.0,
        },
        "cloc_grounding_acc50": {
            "value": g_cloc,
            "threshold": 0.5,
            "met": None if g_cloc is None else g_cloc >= 0.5,
        },
        "cloc_grounding_beats_clip": {
            "value": None if g_cloc is None or g_clip is None else round(g_cloc - g_clip, 4),
            "threshold": 0.0,
            "met": None if g_cloc is None or g_clip is None else g_cloc > g_clip,
        },
    }
    timings = _stage_times(results, recipes, "seconds")
    timings["wall_this_run"] = round(wall_seconds, 1)
    return {
        "plan": plan.name,
        "seed": plan.seed,
        "recipes": recipes,
        "encoders": encoders,
        "export": export,
        "mllm": mllm,
        "timings_s": timings,
        "cpu_s": _stage_times(results, recipes, "cpu_seconds"),
        "targets": targets,
        "stages": {name: {"status": r.status, "message": r.message} for name, r in results.items()},
    }


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _fmt_s(v) -> str:
    return "—" if v is None else f"{v:.1f}"


def _fmt_diff(v) -> str:
    return "—" if v is None else f"{v:.1e}"


def table_markdown(report: dict) -> str:
    recipes = report["recipes"]
    rows = ["| metric | " + " | ".join(recipes) + " |", "|---|" + "---|" * len(recipes)]
    for k in ENCODER_KEYS:
        rows.append(f"| encoder {k} | " + " | ".join(_fmt(report["encoders"][r][k]) for r in recipes) + " |")
    rows.append(
        "| export max_abs_diff | "
        + " | ".join(_fmt_diff(report["export"][r]["max_abs_diff"]) for r in recipes)
        + " |"
    )
    for k in (*MLLM_KEYS, PROPOSAL_KEY):
        rows.append(f"| mllm {k} | " + " | ".join(_fmt(report["mllm"][r].get(k)) for r in recipes) + " |")
    return "\n".join(rows)


def targets_markdown(report: dict) -> str:
    lines = []
    for name, t in report["targets"].items():
        verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"- `{name}`: {_fmt(t['value'])} (threshold {t['threshold']}) — **{verdict}**")
    return "\n".join(lines)


def _loss_rows(path: Path) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "loss" in row and "step" in row:
                steps.append(int(row["step"]))
                losses.append(float(row["loss"]))
    return steps, losses


def plot_curves(workdir: Path, recipes: list[str]) -> list[str]:
    """Loss curves from each stage's metrics.jsonl, one PNG per kind of run.

    Fine-tuning runs in two stages (two metrics files); stage 2 is drawn after stage 1 on one
    step axis, with a dotted line where it starts.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = {
        "pretrain": ("pretrain_{}/metrics.jsonl",),
        "finetune": ("mllm_{}/stage1/metrics.jsonl", "mllm_{}/stage2/metrics.jsonl"),
    }
    written = []
    for kind, patterns in kinds.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        plotted = False
        for r in recipes:
            steps, losses, offset = [], [], 0
            for i, pattern in enumerate(patterns):
                part_steps, part_losses = _loss_rows(workdir / pattern.format(r))
                if i and part_steps and r == recipes[0]:
                    ax.axvline(offset, color="grey", linestyle=":", linewidth=1)
                steps += [offset + x for x in part_steps]
                losses += part_losses
                offset += max(part_steps, default=0)
            if steps:
                ax.plot(steps, losses, label=r)
                plotted = True
        if plotted:
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.set_yscale("log")
            ax.set_title(f"{kind} loss")
            ax.legend()
            fig.tight_layout()
            out = workdir / f"{kind}_loss.png"
            tmp = out.with_name(out.stem + ".tmp.png")
            fig.savefig(tmp, dpi=110, format="png")
            os.replace(tmp, out)
            written.append(out.name)
        plt.close(fig)
    return written


def write_report(workdir: Path, report: dict, results: dict) -> None:
    tmp = workdir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, workdir / "report.json")
    figures = plot_curves(workdir, report["recipes"])
    examples = sorted(p.relative_to(workdir).as_posix() for p in workdir.glob("examples_*/*.png"))[:8]
    lines = [
        "# clocmllm demo report",
        "",
        f"Plan `{report['plan']}`, seed {report['seed']}; figures on held-out synthetic images.",
        "",
        table_markdown(report),
        "",
        "## Targets",
        "",
        *(
            ["The targets are set for the full plan; the quick plan is a smoke run of the pipeline.", ""]
            if report["plan"] != "full"
            else []
        ),
        targets_markdown(report),
        "",
        "## Timings (s)",
        "",
        "CPU: user + system seconds of the stage's processes (both cores count), a measure that",
        "depends much less than wall time on what else the machine runs.",
        "",
        "| stage | wall | CPU |",
        "|---|---|---|",
        *[
            f"| {k} | {_fmt_s(v)} | {_fmt_s(report.get('cpu_s', {}).get(k))} |"
            for k, v in report["timings_s"].items()
        ],
        "",
        "## Stages",
        "",
        *[
            f"- {n}: {s['status']}{' — ' + s['message'] if s['message'] else ''}"
            for n, s in report["stages"].items()
        ],
        "",
    ]
    if figures:
        lines += ["## Loss curves", "", *[f"![{f}]({f})" for f in figures], ""]
    if examples:
        lines += [
            "## Grounding examples (green: truth, red: prediction)",
            "",
            *[f"![{e}]({e})" for e in examples],
            "",
        ]
    (workdir / "report.md").write_text("\n".join(lines))
