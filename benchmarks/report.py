"""Results on disk: the JSON, one PNG of plots, and markdown summaries (a file beside the JSON and,
for real runs into benchmarks/results/, the block between the markers in benchmarks/README.md).

Regenerate the plots and summaries of a results file (e.g. one brought back from a GPU machine):

    python -m benchmarks.report benchmarks/results/<device>-<date>.json [--readme]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

README = Path(__file__).resolve().parent / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

# One panel per line: (op, fixed config values, x axis, metric, title, config keys that move with x)
PANELS = (
    ("attention", {"pass": "fwd", "mask": "causal"}, "S", "tflops", "attention fwd, causal", ("B", "H")),
    ("attention", {"pass": "fwd+bwd", "mask": "causal"}, "S", "tflops", "attention fwd+bwd, causal", ("B", "H")),
    ("attention", {"pass": "fwd+bwd", "mask": "prefix"}, "S", "tflops", "attention fwd+bwd, prefix-LM",
     ("B", "H", "prefix_len")),
    ("layer_norm", {"pass": "fwd+bwd", "residual": True}, "hidden", "gbps", "layer_norm + residual, fwd+bwd", ()),
    ("rms_norm", {"pass": "fwd+bwd", "residual": True}, "hidden", "gbps", "rms_norm + residual, fwd+bwd", ()),
    ("layer_norm", {"pass": "fwd", "residual": False}, "hidden", "gbps", "layer_norm fwd", ()),
    ("softmax", {"pass": "fwd+bwd"}, "cols", "gbps", "softmax fwd+bwd", ("rows",)),
    ("cross_entropy", {"pass": "fwd+bwd"}, "vocab", "gbps", "cross_entropy fwd+bwd", ()),
    ("train_step", {}, None, "tokens_per_s", "training step", ()),
)
UNITS = {"tflops": "TFLOP/s", "gbps": "GB/s", "tokens_per_s": "tokens/s"}
CEILING_OF = {"tflops": "matmul_tflops", "gbps": "copy_gbps"}


# ---------------------------------------------------------------------------------- writing
def write(results: dict, out_dir: Path, stem: str, readme: Optional[Path] = None) -> list[Path]:
    """Write <stem>.json, <stem>.png and <stem>.md into out_dir (and the README block when asked)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=1, sort_keys=False, default=str) + "\n")
    return [json_path] + write_derived(results, json_path, readme)


def write_derived(results: dict, json_path: Path, readme: Optional[Path] = None) -> list[Path]:
    paths = []
    png = json_path.with_suffix(".png")
    try:
        plot(results, png)
        paths.append(png)
    except ImportError as e:
        print(f"no plots: {e}", file=sys.stderr)
    md = json_path.with_suffix(".md")
    md.write_text(summary_markdown(results, plot_name=png.name if png in paths else None))
    paths.append(md)
    if readme is not None:
        update_readme(readme, summary_markdown(results, plot_name=_relative(png, readme.parent)))
        paths.append(readme)
    return paths


def _relative(path: Path, start: Path) -> str:
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path)


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text() if readme.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{block.strip()}\n{END}{tail}")


# ---------------------------------------------------------------------------------- summaries
def _geomean(values: list[float]) -> Optional[float]:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _median(values: list[float]) -> Optional[float]:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _metric(row: dict) -> str:
    return "tflops" if "tflops" in row else "gbps"


def groups(results: dict) -> dict:
    """(op, pass, impl) -> the measured rows, kernel ops only (the training step has its own table)."""
    out = defaultdict(list)
    for row in results["rows"]:
        if row["op"] != "train_step" and row["ms"] is not None:
            out[(row["op"], row["config"].get("pass", ""), row["impl"])].append(row)
    return out


def speedup_pivot(results: dict) -> str:
    """The short table: geometric-mean speedup over the reference, one line per (op, pass)."""
    by = groups(results)
    impls = sorted({k[2] for k in by}, key=lambda i: (not i.startswith("mmgpt"), i))
    keys = sorted({k[:2] for k in by})
    if not keys:
        return "(no kernel rows measured)\n"
    lines = ["| op | pass | " + " | ".join(impls) + " |", "|---|---|" + "---|" * len(impls)]
    for op, pass_ in keys:
        cells = []
        for impl in impls:
            g = _geomean([r["speedup_vs_reference"] for r in by.get((op, pass_, impl), [])])
            cells.append(f"x{g:.2f}" if g else "")
        lines.append(f"| {op} | {pass_} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def detail_table(results: dict) -> str:
    by = groups(results)
    lines = ["| op | pass | impl | configs | median rate | best % of ceiling | speedup vs reference (geo-mean) "
             "| median peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for (op, pass_, impl), rows in sorted(by.items()):
        metric = _metric(rows[0])
        rate = _median([r[metric] for r in rows])
        frac = max((r["fraction_of_ceiling"] for r in rows if r["fraction_of_ceiling"] is not None), default=None)
        speed = _geomean([r["speedup_vs_reference"] for r in rows])
        mem = _median([r["peak_mem_mb"] for r in rows])
        refs = ", ".join(sorted({r["reference"] for r in rows if r["reference"]}))
        frac_s = f"{100 * frac:.1f}%" if frac is not None else "-"
        speed_s = f"x{speed:.2f} ({refs})" if speed else "-"
        mem_s = f"{mem:.0f}" if mem is not None else "-"
        lines.append(f"| {op} | {pass_} | {impl} | {len(rows)} | {rate:.1f} {UNITS[metric]} | {frac_s} | {speed_s} "
                     f"| {mem_s} |")
    return "\n".join(lines) + "\n"


def train_table(results: dict) -> str:
    rows = [r for r in results["rows"] if r["op"] == "train_step"]
    if not rows:
        return ""
    lines = ["| preset | impl | seq | batch | dtype | ms/step | tokens/s | TFLOP/s | MFU | % of matmul ceiling |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        head = f"| {c.get('preset')} | {r['impl']} | {c.get('seq_len')} | {c.get('batch')} | {c.get('dtype')} |"
        if r["ms"] is None:
            lines.append(f"{head} skipped: {r.get('skipped', '')} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}% of {r['mfu_peak_tflops']:.0f}" if r.get("mfu") is not None else "-"
        frac = f"{100 * r['fraction_of_ceiling']:.1f}%" if r["fraction_of_ceiling"] is not None else "-"
        lines.append(f"{head} {r['ms']:.1f} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | {mfu} | {frac} |")
    return "\n".join(lines) + "\n"


def skipped_lines(results: dict) -> str:
    reasons = defaultdict(int)
    for s in results.get("skipped", []):
        reasons[(s["op"], s["impl"], s["reason"])] += 0
    for row in results["rows"]:
        if row["ms"] is None:
            reasons[(row["op"], row["impl"], row.get("skipped", ""))] += 1
    lines = []
    for (op, impl, reason), n in sorted(reasons.items()):
        count = f" ({n} configs)" if n else " (whole run)"
        lines.append(f"- {op} / {impl}{count}: {reason}")
    for e in results.get("errors", []):
        lines.append(f"- suite {e['suite']} crashed: {e['error']}")
    return "\n".join(lines) + ("\n" if lines else "")


def header(results: dict) -> str:
    c, v = results.get("ceilings", {}), results
    peak = c.get("dense_bf16_peak_tflops")
    peak_s = f"{peak:.0f} TFLOP/s ({c.get('dense_bf16_peak_source')})" if peak else "unknown card"
    shape = "x".join(map(str, c.get("matmul_shape", [])))
    return (f"**{v['device']}** · torch {v['torch']} · triton {v['triton']} · CUDA {v['cuda']} · commit "
            f"`{v['commit']}` · {v['date']} · {v['mode']}\n\n"
            f"Ceilings measured first: device copy **{c.get('copy_gbps', 0):.4g} GB/s** (read + write), bf16 "
            f"matmul **{c.get('matmul_tflops', 0):.4g} TFLOP/s** ({shape}); dense bf16 peak used for MFU: {peak_s}.\n")


def summary_markdown(results: dict, plot_name: Optional[str] = None) -> str:
    parts = [header(results), "\nGeometric-mean speedup over the reference (the fastest PyTorch implementation "
             "measured in the same configuration):\n\n", speedup_pivot(results), "\n", detail_table(results)]
    train = train_table(results)
    if train:
        parts += ["\nTraining step:\n\n", train]
    skipped = skipped_lines(results)
    if skipped:
        parts += ["\nNot measured:\n\n", skipped]
    if plot_name:
        parts.append(f"\n![benchmark plots]({plot_name})\n")
    return "".join(parts)


# ---------------------------------------------------------------------------------- plots
def _panel_rows(rows: list[dict], op: str, where: dict, x: Optional[str], free: tuple) -> list[dict]:
    rows = [r for r in rows if r["op"] == op and r["ms"] is not None
            and all(r["config"].get(k) == v for k, v in where.items())]
    if not rows or x is None:
        return rows
    fixed = {k: v for k, v in rows[0]["config"].items() if k != x and k not in free and k not in where}
    return [r for r in rows if all(r["config"].get(k) == v for k, v in fixed.items())]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p, _panel_rows(results["rows"], p[0], p[1], p[2], p[5])) for p in PANELS]
    panels = [(p, rows) for p, rows in panels if rows]
    ncols = 3
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, ((op, where, x, metric, title, free), rows) in zip(axes.flat, panels):
        if x is None:
            labels = [f"{r['config'].get('preset')}\n{r['impl']}" for r in rows]
            ax.bar(range(len(rows)), [r[metric] for r in rows], color="tab:blue")
            ax.set_xticks(range(len(rows)), labels, fontsize=7)
            for i, r in enumerate(rows):
                if r.get("mfu") is not None:
                    ax.annotate(f"MFU {100 * r['mfu']:.0f}%", (i, r[metric]), ha="center", va="bottom", fontsize=7)
        else:
            series = defaultdict(list)
            for r in rows:
                series[r["impl"]].append((r["config"][x], r[metric]))
            for impl, pts in sorted(series.items()):
                pts.sort()
                style = "-" if impl.startswith("mmgpt") else "--"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=impl)
            ceiling = results.get("ceilings", {}).get(CEILING_OF.get(metric, ""), None)
            if ceiling:
                ax.axhline(ceiling, color="gray", linestyle=":", label="measured ceiling")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x)
            ax.legend(fontsize=7)
        fixed = {k: v for k, v in rows[0]["config"].items() if k != x and k not in free}
        ax.set_title(f"{title}\n{' '.join(f'{k}={v}' for k, v in fixed.items())}", fontsize=8)
        ax.set_ylabel(UNITS[metric])
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['device']} · {results['date']} · {results['mode']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a results JSON written by python -m benchmarks")
    parser.add_argument("--readme", action="store_true", help=f"also update the summary block in {README}")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    for p in write_derived(results, args.results, README if args.readme else None):
        print(f"wrote {p}")
    print(speedup_pivot(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
