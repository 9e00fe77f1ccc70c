"""The HTML report of ``visalign demo``: paired before/after images, curves, attribute table, proxy vs oracle.

Everything the page shows is a file next to it (PNG images and plots), so the folder can be zipped or served as is.
Images are upscaled with nearest-neighbour (the world is 32 px) so the shapes stay crisp.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import torch

from visalign.media import make_grid, save_image
from visalign.shapes.demo import parse_extra_reward

UPSCALE = 4
ATTRIBUTE_ORDER = ("colour", "shape", "count", "position")


def _upscaled(image: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` → ``[3, 4H, 4W]`` by pixel repetition."""
    return image.repeat_interleave(UPSCALE, 1).repeat_interleave(UPSCALE, 2)


def write_pair_images(run_dir: Path, result: Any) -> dict[str, list[dict[str, Any]]]:
    """Save before/after PNGs of the first ``grid_prompts`` prompts per set; return rows for the HTML table."""
    folder = run_dir / "images"
    folder.mkdir(exist_ok=True)
    count = int(result.config["grid_prompts"])
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, prompts in result.prompts.eval_sets.items():
        rows[name] = []
        for i, prompt in enumerate(prompts[:count]):
            entry = {"prompt": prompt}
            for stage, evaluation in (("before", result.before), ("after", result.after)):
                path = folder / f"{name}-{i:03d}-{stage}.png"
                image, ok = evaluation.first(name, i)
                save_image(_upscaled(image), path)
                entry[stage] = path.relative_to(run_dir).as_posix()
                entry[f"{stage}_ok"] = ok
            rows[name].append(entry)
        pairs = torch.stack([torch.stack([result.before.first(name, i)[0], result.after.first(name, i)[0]])
                             for i in range(min(count, len(prompts)))]).flatten(0, 1)
        save_image(make_grid(torch.stack([_upscaled(p) for p in pairs]), columns=8), run_dir / f"grid-{name}.png")
    return rows


def plot_curves(run_dir: Path, history: list[dict[str, Any]], reward_name: str, oracle_name: str,
                extra_names: tuple[str, ...] = (), polish_names: tuple[str, ...] = ()) -> str | None:
    """Training-batch reward (proxy), any extra reward terms and the oracle per iteration → ``curves.png``; None
    without matplotlib. Rows tagged ``stage: polish`` follow the alignment's, behind a dashed line; their terms
    (``polish_names``, e.g. the polish reward and the ``oracle`` monitor) are plotted where not already."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lines = [(reward_name, f"proxy ({reward_name})")] if reward_name != oracle_name else []
    lines += [(name, f"extra term ({name})") for name in extra_names if name != oracle_name]
    lines += [(oracle_name, "oracle (gold)")]
    if any(r.get("stage") == "polish" for r in history):
        # The polish stage logs its own reward and the oracle under the monitor's name; plot them as they are.
        lines += [(name, f"polish ({name})") for name in polish_names if name not in dict(lines)]
    rows = [r for r in history if any(f"reward/{key}/mean" in r for key, _ in lines)]
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    steps = [r["step"] for r in rows]
    for key, label in lines:
        values = [r.get(f"reward/{key}/mean") for r in rows]
        if any(v is not None for v in values):
            ax.plot(steps, [math.nan if v is None else v for v in values], marker=".", label=label)
    polish_start = next((r["step"] for r in rows if r.get("stage") == "polish"), None)
    if polish_start is not None:
        ax.axvline(polish_start - 0.5, color="grey", linestyle="--", linewidth=1)
        ax.text(polish_start, ax.get_ylim()[0], " polish (η = 0)", color="grey", va="bottom", fontsize=8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean reward on training samples")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png")
    plt.close(fig)
    return "curves.png"


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _delta(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "–"
    return f"{100 * (after - before):+.1f}"


def attribute_table(result: Any) -> str:
    """Rows: set × (all, reward, attributes, proxy); columns: before, after, change (percentage points)."""
    lines = ["<table class='nums'><tr><th>set</th><th>metric</th><th>before</th><th>after</th><th>change</th></tr>"]
    for name in result.prompts.eval_sets:
        b, a = result.before.oracle[name], result.after.oracle[name]
        metrics = [("oracle: all attributes", b["all"], a["all"]), ("oracle: reward", b["reward"], a["reward"])]
        metrics += [(f"oracle: {k}", b["attributes"].get(k), a["attributes"].get(k))
                    for k in ATTRIBUTE_ORDER if k in b["attributes"]]
        metrics += [(f"oracle: {k} prompts (all)", b["kinds"].get(k), a["kinds"].get(k)) for k in sorted(b["kinds"])]
        metrics.append((f"proxy: {result.config['reward']}", result.before.proxy[name], result.after.proxy[name]))
        for label, vb, va in metrics:
            lines.append(f"<tr><td>{html.escape(name)} ({len(result.prompts.eval_sets[name])} prompts, "
                         f"n={b['n']})</td><td>{html.escape(label)}</td>"
                         f"<td>{_pct(vb)}</td><td>{_pct(va)}</td><td>{_delta(vb, va)}</td></tr>")
    lines.append("</table>")
    return "\n".join(lines)


def gap_paragraph(result: Any) -> str:
    """Proxy gain vs oracle gain on the evaluation sets: a proxy that rises while the oracle does not is hacked."""
    parts = []
    for name in result.prompts.eval_sets:
        proxy_gain = result.after.proxy[name] - result.before.proxy[name]
        oracle_gain = result.after.oracle[name]["reward"] - result.before.oracle[name]["reward"]
        parts.append(f"<li><b>{html.escape(name)}</b>: proxy reward {_delta(0.0, proxy_gain)} pts, oracle "
                     f"reward {_delta(0.0, oracle_gain)} pts, gap (proxy − oracle) {_delta(oracle_gain, proxy_gain)}"
                     " pts</li>")
    return ("<p>Both rewards are means over the same evaluation samples (η = 0, fixed seeds) in [0, 1]. A gap that "
            "grows positive means the model learnt what the proxy likes rather than what the prompt says.</p><ul>"
            + "".join(parts) + "</ul>")


def _pairs_html(rows: dict[str, list[dict[str, Any]]]) -> str:
    out = []
    for name, entries in rows.items():
        out.append(f"<h3>{html.escape(name)}</h3><div class='pairs'>")
        for e in entries:
            marks = ["✓" if e["before_ok"] else "✗", "✓" if e["after_ok"] else "✗"]
            out.append(f"<figure><img src='{e['before']}' alt='before'><img src='{e['after']}' alt='after'>"
                       f"<figcaption>{html.escape(e['prompt'])}<br>before {marks[0]} · after {marks[1]}"
                       "</figcaption></figure>")
        out.append("</div>")
    return "\n".join(out)


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table.nums{border-collapse:collapse}table.nums td,table.nums th{border:1px solid #ccc;padding:2px 8px;
text-align:right}.pairs{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:270px}
figure img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #888;margin-right:4px}
figcaption{font-size:12px}"""


def write_report(run_dir: Path, result: Any) -> Path:
    """Write ``report.html`` (and its PNGs) into ``run_dir``; returns the report's path."""
    rows = write_pair_images(run_dir, result)
    c = result.config
    extras = tuple(parse_extra_reward(entry)[0] for entry in c.get("extra_rewards", ()))
    oracle = "shapes-oracle" if "shapes-oracle" in (c["reward"], *extras) else "oracle"
    polish_terms = [tuple(t) for t in c.get("polish_terms", ())]
    polish = (*(name for name, _ in polish_terms), "oracle") if polish_terms else ()
    curves = plot_curves(run_dir, result.history, c["reward"], oracle, extras, polish)
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    body = [
        "<h1>visalign demo: aligning the shapes world</h1>",
        f"<p>Base model <code>{html.escape(c['base_model'])}</code>; reward <code>{html.escape(c['reward'])}"
        "</code>"
        + "".join(f" plus <code>{html.escape(e)}</code>" for e in c.get("extra_rewards", ())) +
        f"; objective <code>{html.escape(c['objective'])}</code>, {c['iterations']} iterations × "
        f"{c['prompts_per_step']} prompts × {c['images_per_prompt']} samples, LoRA rank {c['lora_rank']}, lr "
        f"{c['lr']}"
        + (f"; then a polish stage: {c['polish_iterations']} iterations of DRaFT-K (K = {c['polish_k']}, η = 0) "
           "on " + " + ".join(f"{w:g} × <code>{html.escape(name)}</code>" for name, w in polish_terms)
           + f", lr {c['polish_lr']}" if polish_terms else "")
        + f". Evaluation prompts are never trained on. Time: {seconds}.</p>",
        "<h2>Oracle accuracy before → after</h2>", attribute_table(result),
        "<h2>Proxy vs oracle</h2>", gap_paragraph(result),
        "<h2>Training curves</h2>",
        f"<img src='{curves}' alt='reward and oracle curves'>" if curves else "<p>(matplotlib not installed)</p>",
        "<h2>Before / after, same seeds</h2><p>Left: base model. Right: aligned. ✓ = every attribute right "
        "(oracle).</p>", _pairs_html(rows),
    ]
    path = run_dir / "report.html"
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>visalign demo</title><style>{STYLE}"
                    f"</style></head><body>{''.join(body)}</body></html>", encoding="utf-8")
    return path
