"""The lab's report: ``report.md`` and ``report.html`` with PNG plots in ``<lake>/lab/<name>/``, and one
TensorBoard scalar series per run in ``<lake>/lab/<name>/tensorboard``.

Sections: the ranking of the variants by held-out loss at equal tokens; per variant the perplexity per
source and the training loss per category; the loss curves (per variant, and per category); every law
with its parameters, 95% bootstrap intervals, its reference and its plot; the prediction and its error;
the accuracy each variant's NLL maps to.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from jobs.lab_plan import Plan
from jobs.lab_results import RunResult, ranking


def write_report(folder: Path, plan: Plan, results: list[RunResult], outcome=None) -> Path:
    """Plots, TensorBoard and the two report files; the Markdown report's path."""
    plots = folder / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    figures = curve_plots(plots, results) + (law_plots(plots, outcome) if outcome is not None else [])
    write_tensorboard(folder / "tensorboard", results)
    markdown = report_markdown(plan, results, outcome, [(title, path.relative_to(folder)) for title, path in figures])
    (folder / "report.md").write_text(markdown, encoding="utf-8")
    (folder / "report.html").write_text(markdown_to_html(markdown, f"tokenmill lab {plan.name}"), encoding="utf-8")
    return folder / "report.md"


def report_markdown(plan: Plan, results: list[RunResult], outcome, figures: list[tuple[str, Path]]) -> str:
    variants = ranking(results)
    sources = sorted({s for r in variants for s in r.perplexity_by_source})
    categories = sorted({c for r in variants for c in r.loss_by_category})
    out = [f"# tokenmill lab: {plan.name}", "",
           f"{len(variants)} variants at {plan.budget_tokens:,} tokens each, ranked by held-out loss (the mean over "
           f"sources of ln perplexity on the held-out documents, measured at each run's last step); training loss "
           f"per category is the mean of each run's last tenth of steps.", "",
           "## Ranking", "",
           _row(["rank", "variant", "tokens", "held-out loss", *[f"ppl {s}" for s in sources],
                 *[f"loss {c}" for c in categories]]),
           _row(["---"] * (4 + len(sources) + len(categories)))]
    for i, r in enumerate(variants, 1):
        out.append(_row([str(i), r.name, f"{r.tokens:,}", f"{r.heldout_loss:.4f}",
                         *[_num(r.perplexity_by_source.get(s), ".2f") for s in sources],
                         *[_num(r.loss_by_category.get(c), ".4f") for c in categories]]))
    if outcome is not None:
        out += ["", "## Scaling laws", "", "Fitted to the runs of `laws:` (95% bootstrap intervals in brackets).", ""]
        out += [f"- {law.line()}" for law in outcome.laws]
        out += ["", "## Prediction", ""] + [f"- {line}" for line in outcome.lines()[len(outcome.laws):]]
        out.append(f"- {outcome.prediction_line()}")
        if outcome.accuracy_of:
            out += ["", "## Accuracy each variant will reach (from its final NLL through the fitted sigmoid)", "",
                    _row(["variant", "accuracy"]), _row(["---", "---"])]
            out += [_row([name, f"{acc:.3f}"]) for name, acc in sorted(outcome.accuracy_of.items())]
    out += ["", "## Runs", "", _row(["run", "group", "N (non-embedding)", "batch", "steps", "tokens", "held-out loss"]),
            _row(["---"] * 7)]
    out += [_row([r.name, r.group, _num(r.parameters, ","), str(r.batch), str(r.steps), f"{r.tokens:,}",
                  f"{r.heldout_loss:.4f}"]) for r in results]
    out += ["", "## Figures", ""] + [f"![{title}]({path.as_posix()})" for title, path in figures]
    return "\n".join(out) + "\n"


def curve_plots(plots: Path, results: list[RunResult]) -> list[tuple[str, Path]]:
    from jobs.lab_plots import plot_curves

    variants = [r for r in results if r.group == "variant"]
    out = [("training loss against tokens, per variant",
            Path(plot_curves({r.name: r.curve for r in variants}, str(plots / "loss_variants.png"),
                             "training loss per variant")))]
    for category in sorted({c for r in variants for c in r.category_curves}):
        curves = {r.name: r.category_curves[category] for r in variants if category in r.category_curves}
        out.append((f"training loss of {category} against tokens",
                    Path(plot_curves(curves, str(plots / f"loss_{_slug(category)}.png"), f"loss of {category} per variant"))))
    return out


def law_plots(plots: Path, outcome) -> list[tuple[str, Path]]:
    """Each fitted law with its points; L(C) and L(N, D) (at compute 6·N·D, along its compute-optimal
    frontier) with the predicted run, predicted and observed."""
    from jobs.lab_plots import plot_fit

    out = []
    for law in outcome.laws:
        if law.fit is None or not law.points:
            continue
        predicted = observed = None
        if law.title in ("L(C)", "L(N, D)") and outcome.predicted_loss is not None:
            n, d = outcome.predict.parameters, outcome.predict.tokens
            compute = 6.0 * n * d
            predicted = (compute, float(law.fit.predict(n, d) if law.title == "L(N, D)" else law.fit.predict(compute)))
            observed = (compute, outcome.observed_loss) if outcome.observed_loss is not None else None
        path = plot_fit(law.fit, [x for x, _ in law.points], [y for _, y in law.points],
                        str(plots / f"law_{_slug(law.title)}.png"), law.title, predicted, observed,
                        log_x=law.title not in ("acc(NLL)", "BS(L)"))
        out.append((law.title, Path(path)))
    return out


def write_tensorboard(folder: Path, results: list[RunResult]) -> None:
    """One run folder per lab run: its training loss and held-out loss against tokens."""
    from torch.utils.tensorboard import SummaryWriter

    for r in results:
        writer = SummaryWriter(str(folder / r.name))
        for tokens, loss in r.curve:
            writer.add_scalar("loss", loss, tokens)
        for tokens, loss in r.heldout_curve:
            writer.add_scalar("heldout_loss", loss, tokens)
        writer.close()


def markdown_to_html(markdown: str, title: str) -> str:
    """The report's Markdown (headings, lists, pipe tables, images, paragraphs) as one HTML page."""
    body, table = [], []

    def flush_table():
        if table:
            rows = [[html.escape(c.strip()) for c in line.strip("|").split("|")] for line in table if "---" not in line]
            body.append("<table>" + "".join(f"<tr>{''.join(f'<{t}>{c}</{t}>' for c in row)}</tr>"
                                              for t, row in (("th" if i == 0 else "td", r) for i, r in enumerate(rows)))
                        + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if image := re.fullmatch(r"!\[(.*)\]\((.*)\)", line):
            body.append(f'<figure><img src="{html.escape(image[2])}" alt="{html.escape(image[1])}">'
                        f"<figcaption>{html.escape(image[1])}</figcaption></figure>")
        elif heading := re.match(r"(#+) (.*)", line):
            level = len(heading[1])
            body.append(f"<h{level}>{html.escape(heading[2])}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;max-width:70em;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:48em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _num(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
