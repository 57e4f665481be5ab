"""`dspark eval`: acceptance of one or more drafters on held-out prompts, per domain.

Runs real speculative rounds (drafters/speculate.py) at a fixed gamma and reports, per drafter:
    tau[domain], tau["all"] (pooled over rounds), tau["macro"] (mean over domains)
    conditional_acceptance[domain][k]: P(draft k accepted | drafts 1..k-1 accepted)
and optionally a PNG of conditional acceptance per position, one line per drafter.
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from drafters.registry import SHIPPED
from drafters.speculate import SpecStats, speculative_generate
from engine.messages import SamplingParams


def evaluate(core, text, drafters: dict, prompts: list[dict], temperature: float,
             max_new_tokens: int, batch: int, seed: int = 0, progress: bool = True) -> dict:
    """drafters: name -> Drafter; prompts: [{"domain", "prompt"}] -> report dict."""
    domains = sorted({p["domain"] for p in prompts}, key=_domain_order)
    encoded = [(p["domain"], text.apply_chat_template([{"role": "user", "content": p["prompt"]}]))
               for p in prompts]
    report = {"temperature": temperature, "max_new_tokens": max_new_tokens,
              "prompts": {d: sum(1 for p in prompts if p["domain"] == d) for d in domains},
              "drafters": {}}
    for name, drafter in drafters.items():
        per_domain = {d: SpecStats(drafter.gamma) for d in domains}
        bar = tqdm(total=len(encoded), desc=f"eval {name} T={temperature:g}", unit="prompt",
                   disable=not progress)
        for start in range(0, len(encoded), batch):
            chunk = encoded[start:start + batch]
            params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens,
                                    seed=seed + start)
            _, stats = speculative_generate(core, drafter, [ids for _, ids in chunk], params)
            for (domain, _), s in zip(chunk, stats):
                per_domain[domain].merge(s)
            bar.update(len(chunk))
        bar.close()
        report["drafters"][name] = _summary(per_domain, drafter)
    return report


def _domain_order(domain: str) -> tuple[int, str]:
    order = {"math": 0, "code": 1, "chat": 2}
    return order.get(domain, 9), domain


def _summary(per_domain: dict[str, SpecStats], drafter) -> dict:
    pooled = SpecStats(drafter.gamma)
    for s in per_domain.values():
        pooled.merge(s)
    taus = {d: round(s.tau, 4) for d, s in per_domain.items()}
    out = {"method": drafter.config.method, "head": drafter.config.head,
           "block_size": drafter.gamma,
           "tau": {**taus, "all": round(pooled.tau, 4),
                   "macro": round(sum(taus.values()) / len(taus), 4)},
           "conditional_acceptance": {d: _rounded(s.conditional_acceptance())
                                      for d, s in {**per_domain, "all": pooled}.items()},
           "rounds": pooled.rounds}
    return out


def _rounded(values: list) -> list:
    return [None if v is None else round(v, 4) for v in values]


def write_outputs(report: dict, json_path: str | None, plot_path: str | None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1))
    if plot_path:
        plot_acceptance([report], plot_path)


def plot_acceptance(reports: list[dict], path: str) -> None:
    """A row of panels per report (temperature), one panel per domain (+ all); a line per drafter."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(reports[0]["prompts"]) + ["all"]
    fig, axes = plt.subplots(len(reports), len(domains), squeeze=False, sharey=True,
                             figsize=(3.6 * len(domains), 3.2 * len(reports)))
    for row, report in zip(axes, reports):
        for ax, domain in zip(row, domains):
            for name, r in report["drafters"].items():
                values = r["conditional_acceptance"][domain]
                ks = [k + 1 for k, v in enumerate(values) if v is not None]
                ax.plot(ks, [v for v in values if v is not None], marker="o",
                        label=f"{Path(name).name} (τ {r['tau'][domain]:.2f})")
            ax.set_title(f"{domain}, T={report['temperature']:g}")
            ax.set_xlabel("draft position k")
            ax.set_xticks(range(1, 1 + max(len(r["conditional_acceptance"][domain])
                                          for r in report["drafters"].values())))
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc="best")
        row[0].set_ylabel("P(accept k | 1..k-1 accepted)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def merge_reports(reports: list[dict]) -> dict[float, dict]:
    """Reports of single `dspark eval` runs -> {temperature: {"prompts", "drafters": {...}}}."""
    merged: dict[float, dict] = {}
    for r in reports:
        slot = merged.setdefault(r["temperature"], {"temperature": r["temperature"],
                                                     "prompts": r["prompts"], "drafters": {}})
        slot["drafters"].update(r["drafters"])
    return merged


# the shipped names plus the equal-depth Eagle3 row, longest first ("x-dspark-rnn" is not dspark)
KINDS = tuple(sorted((*SHIPPED, "eagle3-2l"), key=len, reverse=True))


def drafter_kind(name: str) -> str:
    """A drafter path's table name: "runs/drafters/next-dspark-rnn" -> "dspark-rnn" (a set's
    prefix dropped), any other name as it is."""
    base = Path(name).name
    return next((k for k in KINDS if base == k or base.endswith("-" + k)), base)


def markdown_table(reports: list[dict]) -> str:
    """tau per domain for every drafter and temperature, and DSpark's macro-average ratios."""
    merged = merge_reports(reports)
    domains = list(next(iter(merged.values()))["prompts"])
    head = "| drafter | T | " + " | ".join(domains) + " | macro | all |"
    lines = [head, "|" + "---|" * (len(domains) + 4)]
    ratios = []
    for t, report in sorted(merged.items()):
        rows = report["drafters"]
        for name, r in rows.items():
            cells = " | ".join(f"{r['tau'][d]:.2f}" for d in domains)
            lines.append(f"| {Path(name).name} | {t:g} | {cells} | {r['tau']['macro']:.2f} | "
                         f"{r['tau']['all']:.2f} |")
        by = {drafter_kind(n): r["tau"]["macro"] for n, r in rows.items()}
        for other in ("dflash", "eagle3", "eagle3-2l", "mtp1"):
            if "dspark" in by and other in by:
                ratios.append(f"T={t:g}: dspark ÷ {other} = {by['dspark'] / by[other]:.3f}")
    return "\n".join(lines) + ("\n\nmacro-average τ ratios: " + "; ".join(ratios) if ratios else "")
