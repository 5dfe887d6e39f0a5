"""The run report: one self-contained HTML page per run, so a data scientist can *see* what a run produced
(counts, rejects, timings, the PCA's variance, a PC1/PC2 map of the images, how good the features are)
without opening a Parquet file. Plots are inline base64 PNGs: the file opens anywhere, offline.

Train/Test split for the linear probe: a batch is held-out (Test) data when its id holds the token "test"
(`settings().test_batch_pattern`, e.g. `test-20260101`, `fruits360_test`); every other batch is Training.
The probe compares a logistic regression on the PCA features with the same probe on the 1280-d
embeddings, both trained on the Training batches and scored on the Test batches of the same PCA version.

What it reads is bounded whatever the history: the run's own files (validation.json, step metrics), the
model's metadata and scree plot, a few reject files of this run's batches, and the version's report
sample, written by the pca step: at most REPORT_SAMPLE_ROWS rows per split (Training, Test), the bottom
ones by a hash of the path, with their features and embeddings (spark_jobs/fruits_jobs/samples.py).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fruits.catalog import Catalog
from fruits.config import Settings

log = logging.getLogger(__name__)
EMBEDDING_DIM = 1280
MAX_REJECT_EXAMPLES = 25


# --- data -------------------------------------------------------------------------------------------------
@dataclass
class Vectors:
    """Rows of one kind of vector (PCA features or embeddings) for a set of batches, sampled."""

    paths: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    batches: list[str] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list)

    @property
    def matrix(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros((0, 0), np.float32)

    def __len__(self) -> int:
        return len(self.paths)


def is_test_batch(batch_id: str, pattern: str) -> bool:
    return re.search(pattern, batch_id, flags=re.IGNORECASE) is not None


def _as_matrix(column: pa.ChunkedArray, dim: int | None) -> np.ndarray:
    values = pc.list_flatten(column).to_numpy().astype(np.float32, copy=False)
    rows = len(column)
    return values.reshape(rows, dim if dim is not None else (values.size // rows if rows else 0))


def _parquet_tables(catalog: Catalog, folder_uri: str, columns: list[str] | None = None):
    prefix = folder_uri.split("://", 1)[1].split("/", 1)[1] if "://" in folder_uri else folder_uri
    for key in sorted(catalog.hook.list_keys(catalog.bucket, prefix=prefix.rstrip("/") + "/") or []):
        if key.endswith(".parquet"):
            body = catalog.hook.get_key(key, catalog.bucket).get()["Body"].read()
            yield pq.read_table(io.BytesIO(body), columns=columns)


def read_sample(catalog: Catalog, state: dict[str, Any], max_rows: int) -> pa.Table | None:
    """The report sample's rows: base and deltas, the newest copy of each path, then the bottom rows by
    hash per split (what spark_jobs/fruits_jobs/samples.read does, on at most a few thousand rows)."""
    tables = []
    for gen, folder in enumerate(list(state.get("base") or []) + list(state.get("deltas") or [])):
        for t in _parquet_tables(
            catalog, folder, ["batch_id", "path", "label", "h", "split", "features", "embedding"]
        ):
            tables.append(t.append_column("_gen", pa.array([gen] * t.num_rows, pa.int32())))
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="default")
    paths = table.column("path").to_pylist()
    gens = table.column("_gen").to_pylist()
    newest: dict[str, int] = {}
    for i, (path, gen) in enumerate(zip(paths, gens, strict=True)):
        if path not in newest or gen > gens[newest[path]]:
            newest[path] = i
    size = min(int(state.get("size") or max_rows), max_rows)
    order = sorted(newest.values(), key=lambda i: (table.column("h")[i].as_py(), paths[i]))
    kept, per_split = [], {}
    splits = table.column("split").to_pylist()
    for i in order:
        if per_split.get(splits[i], 0) < size:
            per_split[splits[i]] = per_split.get(splits[i], 0) + 1
            kept.append(i)
    return table.take(pa.array(sorted(kept, key=lambda i: paths[i]), pa.int64()))


def vectors_of(table: pa.Table | None, rows: np.ndarray, column: str, dim: int | None) -> Vectors:
    out = Vectors()
    if table is None or not rows.any():
        return out
    part = table.filter(pa.array(rows, pa.bool_()))
    out.paths = part.column("path").to_pylist()
    out.labels = [str(x) for x in part.column("label").to_pylist()]
    out.batches = part.column("batch_id").to_pylist()
    out.chunks = [_as_matrix(part.column(column), dim)]
    return out


def reject_examples(catalog: Catalog, results: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """The first MAX_REJECT_EXAMPLES rejected files of this run: reads only batches that have rejects,
    and stops as soon as it has enough."""
    layout, examples = catalog.layout, []
    for b in sorted(results):
        if not results[b].get("rejected") or len(examples) >= MAX_REJECT_EXAMPLES:
            continue
        for table in _parquet_tables(catalog, layout.partition(layout.rejects, b), ["path", "reason"]):
            for path, reason in zip(
                table.column("path").to_pylist(), table.column("reason").to_pylist(), strict=True
            ):
                if len(examples) < MAX_REJECT_EXAMPLES:
                    examples.append((path, reason))
    return examples


# --- the linear probe -------------------------------------------------------------------------------------
def linear_probe(
    x_train: np.ndarray, y_train: list[str], x_test: np.ndarray, y_test: list[str]
) -> dict[str, Any]:
    """Multinomial logistic regression on standardised inputs; top-1 accuracy on the Test rows whose label
    was seen in training (a probe cannot name a class it never saw; those rows are counted apart)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    seen = set(y_train)
    mask = np.array([y in seen for y in y_test], dtype=bool)
    t0 = time.monotonic()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(x_train, y_train)
    predicted = model.predict(x_test[mask]) if mask.any() else np.array([])
    truth = np.array(y_test, dtype=object)[mask]
    correct = int((predicted == truth).sum()) if mask.any() else 0
    return {
        "dim": int(x_train.shape[1]),
        "train_rows": int(x_train.shape[0]),
        "test_rows": int(mask.sum()),
        "test_rows_unseen_label": int((~mask).sum()),
        "classes": len(seen),
        "correct": correct,
        "accuracy": round(correct / int(mask.sum()), 4) if mask.any() else None,
        "chance": round(1.0 / len(seen), 4) if seen else None,
        "seconds": round(time.monotonic() - t0, 2),
    }


# --- plots ------------------------------------------------------------------------------------------------
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cumulative(meta: dict[str, Any]) -> str:
    plt = _pyplot()
    cumulative = meta["cumulative_explained_variance"]
    k = int(meta["k"])
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = np.arange(1, len(cumulative) + 1)
    ax.plot(xs, cumulative, color="#1f6f8b", linewidth=2, label="cumulative explained variance")
    ax.axvline(k, color="#c0392b", linestyle="--", linewidth=1.2, label=f"chosen k = {k}")
    if meta.get("variance_target"):
        ax.axhline(meta["variance_target"], color="#888", linestyle=":", label="variance target")
    ax.scatter([k], [cumulative[k - 1]], color="#c0392b", zorder=3)
    ax.annotate(
        f"k={k}: {cumulative[k - 1]:.1%}",
        (k, cumulative[k - 1]),
        textcoords="offset points",
        xytext=(8, -16),
        color="#c0392b",
    )
    ax.set_xlabel("number of principal components")
    ax.set_ylabel("share of variance")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _png(fig)


def _colours(n: int) -> list:
    plt = _pyplot()
    palette = list(plt.get_cmap("tab20").colors) + list(plt.get_cmap("tab20b").colors)
    return [palette[i % len(palette)] for i in range(n)]


def plot_scatter(features: Vectors, test_mask: np.ndarray) -> str:
    plt = _pyplot()
    x = features.matrix
    labels = sorted(set(features.labels))
    colours = dict(zip(labels, _colours(len(labels)), strict=True))
    fig, ax = plt.subplots(figsize=(10, 6.5))
    label_arr = np.array(features.labels, dtype=object)
    for label in labels:
        rows = label_arr == label
        for split, marker, size in (("train", "o", 14), ("test", "x", 22)):
            sel = rows & (test_mask if split == "test" else ~test_mask)
            if sel.any():
                ax.scatter(
                    x[sel, 0],
                    x[sel, 1] if x.shape[1] > 1 else np.zeros(int(sel.sum())),
                    s=size,
                    marker=marker,
                    color=colours[label],
                    alpha=0.75,
                    linewidths=1,
                    label=label if split == "train" or not (rows & ~test_mask).any() else None,
                )
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.grid(alpha=0.3)
    title = f"{len(features)} images, {len(labels)} labels"
    if test_mask.any():
        title += " (o Training, x Test)"
    ax.set_title(title)
    if len(labels) <= 40:
        ax.legend(
            loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, ncol=1 if len(labels) <= 20 else 2
        )
    return _png(fig)


def plot_steps(steps: list[dict[str, Any]]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.5 * len(steps)))
    names = [s["step"] for s in steps]
    secs = [s["seconds"] or 0 for s in steps]
    ax.barh(names, secs, color="#8fbf6f")
    for i, v in enumerate(secs):
        ax.text(v, i, f" {v:.1f} s", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(secs + [1]) * 1.2)
    return _png(fig)


# --- HTML -------------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f4;color:#222}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{margin:0 0 4px}h2{margin-top:32px;border-bottom:2px solid #8fbf6f;padding-bottom:4px}
.sub{color:#666;font-size:14px;line-height:1.9}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:16px}
.card{background:#fff;border-radius:8px;padding:12px 16px;min-width:130px;box-shadow:0 1px 3px #0002}
.card b{display:block;font-size:24px}.card span{color:#666;font-size:13px}
table{border-collapse:collapse;background:#fff;margin:8px 0;font-size:14px}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:left}th{background:#eef3ea}
td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;background:#fff;border-radius:6px;box-shadow:0 1px 3px #0002;display:block;margin:8px 0}
.note{color:#555;font-size:14px;max-width:900px}
.ok{color:#1e7d32}.warn{color:#b26a00}
code{background:#eee;padding:1px 4px;border-radius:3px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, fmt: str = "{:,}") -> str:
    if value is None:
        return "n/a"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return _e(value)


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(plot_id: str, b64: str | None, alt: str) -> str:
    if not b64:
        return f'<p class="warn" id="{plot_id}-missing">{_e(alt)}: not available.</p>'
    return f'<img id="{plot_id}" class="plot" alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _cost_section(summary: dict[str, Any]) -> str:
    """EMR runs carry a cost estimate in their summary (plugins/fruits/emr.py): instance-hours x price."""
    cost = summary.get("emr")
    if not cost:
        return ""
    from fruits.config import instance_types

    table = instance_types()
    rows = []
    for kind, hours in sorted((cost.get("instance_hours") or {}).items()):
        price = table[kind].ec2_usd_per_hour + table[kind].emr_usd_per_hour if kind in table else None
        rows.append(
            [
                _e(kind),
                _num(hours, "{:,.3f}"),
                _num(price, "${:,.3f}"),
                _num(hours * price if price is not None else None, "${:,.2f}"),
            ]
        )
    notes = [
        f"cluster <code>{_e(cost.get('cluster_id'))}</code>, up {_num(cost.get('cluster_hours'), '{:.2f}')} h"
    ]
    if not cost.get("final", True):
        notes.append("the cluster had not ended when this was estimated")
    if cost.get("unverified_prices"):
        first = next(iter((cost.get("price_table") or {}).values()), {})
        notes.append(
            f"<b id='cost-unverified'>unverified prices</b> for {_e(', '.join(cost['unverified_prices']))} "
            f"({_e(first.get('source', ''))}, as of {_e(first.get('as_of', ''))}): check them before budgeting"
        )
    if cost.get("unpriced_instance_types"):
        notes.append(f"no price for {_e(', '.join(cost['unpriced_instance_types']))}")
    return (
        "<h2 id='cost'>Compute cost (EMR)</h2>"
        f"<p><b id='cost-total'>Estimated cost: {_num(cost.get('estimated_cost_usd'), '${:,.2f}')}</b> "
        f"(instance-hours x on-demand price; {_e(cost.get('prices', ''))}).</p>"
        + _table(["instance type", "instance-hours", "price per hour (EC2 + EMR)", "cost"], rows, {1, 2, 3})
        + f"<p class='note'>{'; '.join(notes)}. EBS, S3 requests and data transfer are not included.</p>"
    )


def render(ctx: dict[str, Any]) -> str:
    s, meta = ctx["summary"], ctx["pca_meta"]
    cards = [
        (s.get("batches"), "batches"),
        (s.get("images"), "images"),
        (s.get("embedded"), "embedded"),
        (s.get("rejected"), "rejected"),
        (meta["k"], "PCA components (k)"),
        (f"{float(meta['explained_variance_at_k']):.1%}", "variance kept"),
        (s.get("seconds"), "seconds"),
    ]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Fruits! run report: {_e(ctx['run_id'])}</title><style>{CSS}</style></head><body><main>",
        f"<h1>Fruits! run report</h1><p class='sub'>run <code>{_e(ctx['run_id'])}</code> · "
        f"compute <b>{_e(ctx['compute'])}</b> · engine {_e(ctx['engine'])} · model <code>{_e(ctx['model_id'])}"
        f"</code> · PCA <code>{_e(meta['version'])}</code> · written {_e(ctx['written_at'])}</p>",
        "<div class='cards'>"
        + "".join(f"<div class='card'><b>{_num(v)}</b><span>{_e(t)}</span></div>" for v, t in cards)
        + "</div>",
    ]
    deferred = s.get("deferred")  # left for the next run by max_images_per_run (plan.find_batches)
    if deferred:
        parts.append(
            f"<p class='warn' id='deferred'>Backlog: {_num(deferred['batches'])} ready batch(es) with "
            f"{_num(deferred['photos'])} photos wait for the next run (max_images_per_run = "
            f"{_num(deferred['max_images_per_run'])}; the oldest batches go first).</p>"
        )

    # batches and images
    rows = [
        [
            f"<code>{_e(b['batch_id'])}</code>",
            _e(b["split"]),
            _num(b.get("files")),
            _num(b.get("embedded")),
            _num(b.get("rejected")),
            _num(len(b.get("labels") or {})),
            "this run" if b["new"] else "earlier run",
        ]
        for b in ctx["batches"]
    ]
    parts.append("<h2 id='batches'>Batches</h2>")
    parts.append(
        _table(
            ["batch", "split", "files", "embedded", "rejected", "labels", "processed by"], rows, {2, 3, 4, 5}
        )
    )
    if ctx.get("earlier_batches"):
        parts.append(
            f"<p class='note'>{_num(ctx['earlier_batches'])} earlier batch(es) share PCA version "
            f"<code>{_e(meta['version'])}</code>.</p>"
        )
    deferred = s.get("deferred") or {}
    if deferred.get("batches"):
        parts.append(
            f"<p class='note warn' id='deferred'>Left for the next run (max_images_per_run): "
            f"{_num(deferred.get('batches'))} batch(es), {_num(deferred.get('images'))} photo(s).</p>"
        )

    # rejects
    parts.append("<h2 id='rejects'>Rejected files</h2>")
    if ctx["reject_reasons"]:
        parts.append(
            _table(["reason", "files"], [[_e(r), _num(n)] for r, n in ctx["reject_reasons"].items()], {1})
        )
        parts.append(
            f"<p class='note'>First {len(ctx['reject_examples'])} rejected files:</p>"
            + _table(
                ["path", "reason"], [[f"<code>{_e(p)}</code>", _e(r)] for p, r in ctx["reject_examples"]]
            )
        )
    else:
        parts.append("<p class='ok'>No file of this run was rejected.</p>")

    # steps
    parts.append("<h2 id='steps'>Steps: duration and throughput</h2>")
    parts.append(
        _table(
            ["step", "seconds", "rows", "images/s", "notes"],
            [
                [
                    _e(st["step"]),
                    _num(st["seconds"], "{:,.1f}"),
                    _num(st.get("rows")),
                    _num(st.get("rate"), "{:,.1f}"),
                    _e(st.get("notes", "")),
                ]
                for st in ctx["steps"]
            ],
            {1, 2, 3},
        )
    )
    parts.append(_img("plot-steps", ctx["plots"].get("steps"), "step durations"))
    parts.append(_cost_section(s))

    # PCA
    target = meta.get("variance_target")
    parts.append("<h2 id='pca'>PCA</h2>")
    fit_batches = ", ".join(f"<code>{_e(b)}</code>" for b in meta.get("fit_batches", []))
    if meta.get("fit_batch_count", 0) > len(meta.get("fit_batches", [])):
        fit_batches += f" and {meta['fit_batch_count'] - len(meta['fit_batches'])} more"
    sample = meta.get("fit_sample") or {}
    parts.append(
        f"<p class='note'>StandardScaler + PCA fitted on {_num(meta.get('fit_rows'))} embeddings of "
        f"batch(es) {fit_batches}"
        + (
            f" (the sample: the bottom {_num(sample.get('size'))} rows by a hash of the path)"
            if sample.get("size")
            else ""
        )
        + ". "
        f"Mode <b>{_e(meta.get('mode'))}</b>"
        + (f", target {float(target):.0%}" if target else "")
        + f": k = <b>{meta['k']}</b> of {meta.get('input_dim', EMBEDDING_DIM)} dimensions keeps "
        f"<b>{float(meta['explained_variance_at_k']):.2%}</b> of the variance.</p>"
    )
    if ctx["fit_saw_test"]:
        parts.append(
            "<p class='note warn'>The PCA was fitted with Test batches included (unsupervised: no labels "
            "were used). Process Test batches in a later run to keep them fully unseen.</p>"
        )
    parts.append(_img("plot-scree", ctx["plots"].get("scree"), "scree plot (from the model folder)"))
    parts.append(_img("plot-cumulative", ctx["plots"].get("cumulative"), "cumulative explained variance"))

    # scatter
    parts.append("<h2 id='scatter'>PC1 / PC2</h2>")
    parts.append(
        f"<p class='note'>{_num(ctx['scatter_rows'])} images of {_num(ctx['sample']['batches'])} batch(es) "
        "with features in this PCA version (the version's report sample: the bottom rows by a hash of the "
        "path, per split), coloured by label (the variety folder).</p>"
    )
    parts.append(_img("plot-scatter", ctx["plots"].get("scatter"), "PC1/PC2 scatter coloured by label"))

    # probe
    parts.append("<h2 id='probe'>Feature quality: linear probe</h2>")
    probe = ctx["probe"]
    if probe.get("pca") and probe.get("full"):
        rows = [
            [
                name,
                _num(p["dim"]),
                _num(p["train_rows"]),
                _num(p["test_rows"]),
                _num(p["classes"]),
                f"<b>{_num(p['accuracy'], '{:.1%}')}</b>",
                _num(p["chance"], "{:.1%}"),
            ]
            for name, p in (("PCA features", probe["pca"]), ("full embeddings", probe["full"]))
        ]
        parts.append(
            _table(
                ["features", "dim", "train images", "test images", "classes", "top-1 accuracy", "chance"],
                rows,
                {1, 2, 3, 4, 5, 6},
            )
        )
        parts.append(
            "<p class='note'>Logistic regression (multinomial, L2, standardised inputs) trained on the "
            f"Training batches ({', '.join(f'<code>{_e(b)}</code>' for b in probe['train_batches'])}) and "
            f"scored on the Test batches ({', '.join(f'<code>{_e(b)}</code>' for b in probe['test_batches'])})"
            ". A batch is Test data when its id holds the token <code>test</code>."
            + (
                f" {probe['pca']['test_rows_unseen_label']} Test image(s) with a label absent from Training "
                "are left out."
                if probe["pca"]["test_rows_unseen_label"]
                else ""
            )
            + "</p>"
        )
        parts.append(
            f"<p id='probe-result'>probe top-1: PCA {probe['pca']['accuracy']} vs 1280-d "
            f"{probe['full']['accuracy']}</p>"
        )
    else:
        parts.append(f"<p class='note' id='probe-missing'>{_e(probe.get('why', 'not computed'))}</p>")

    parts.append(f"<p class='sub'>Source: <code>{_e(ctx['source'])}</code>. This page is self-contained.</p>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


# --- assembling ---------------------------------------------------------------------------------------------
def _steps(catalog: Catalog, run_prefix: str, summary: dict[str, Any]) -> list[dict[str, Any]]:
    steps = []
    embed = catalog.read_json(f"{run_prefix}embed.json") or {}
    if embed:
        steps.append(
            {
                "step": "embed",
                "seconds": embed.get("seconds"),
                "rows": embed.get("files"),
                "rate": embed.get("images_per_s"),
                "notes": f"inference {embed.get('embed_seconds')} s, engine {embed.get('engine')}",
            }
        )
    pca = catalog.read_json(f"{run_prefix}pca.json") or {}
    if pca:
        secs = pca.get("seconds")
        steps.append(
            {
                "step": "pca",
                "seconds": secs,
                "rows": pca.get("rows"),
                "rate": round(pca["rows"] / secs, 1) if secs and pca.get("rows") else None,
                "notes": (f"fit {pca.get('fit_seconds')} s" if pca.get("fitted") else "transform only"),
            }
        )
    steps.append({"step": "whole run", "seconds": summary.get("seconds"), "rows": summary.get("images")})
    if steps[-1]["seconds"] and summary.get("images"):
        steps[-1]["rate"] = round(summary["images"] / steps[-1]["seconds"], 1)
    return steps


def build(catalog: Catalog, plan: dict[str, Any], summary: dict[str, Any], s: Settings) -> dict[str, Any]:
    """Everything the page shows, read back from S3 (what was validated, not what the tasks believed);
    a bounded read whatever the history."""
    layout = catalog.layout
    version = plan["pca"]["version"]
    meta = catalog.pca_metadata(version)
    k = int(meta["k"])
    validated = catalog.read_json(f"{plan['run_prefix']}validation.json") or {}
    results: dict[str, dict[str, Any]] = validated.get("batches") or {}
    state = catalog.read_json(f"{plan['run_prefix']}sample_report.json") or {}
    sample = read_sample(catalog, state, s.report_max_rows) if state.get("version") == version else None
    sample_batches = sorted(set(sample.column("batch_id").to_pylist())) if sample is not None else []
    is_test = np.array(
        [
            is_test_batch(b, s.test_batch_pattern)
            for b in (sample.column("batch_id").to_pylist() if sample else [])
        ],
        dtype=bool,
    )
    train = [b for b in sample_batches if not is_test_batch(b, s.test_batch_pattern)]
    test = [b for b in sample_batches if is_test_batch(b, s.test_batch_pattern)]
    train_feats = vectors_of(sample, ~is_test, "features", k)
    test_feats = vectors_of(sample, is_test, "features", k)

    plots: dict[str, str | None] = {}
    scree_key = layout.pca_model_prefix(version) + "scree.png"
    if catalog.hook.check_for_key(scree_key, catalog.bucket):
        scree = catalog.hook.get_key(scree_key, catalog.bucket).get()["Body"].read()
        plots["scree"] = base64.b64encode(scree).decode()
    plots["cumulative"] = plot_cumulative(meta)
    everything = Vectors(
        train_feats.paths + test_feats.paths,
        train_feats.labels + test_feats.labels,
        train_feats.batches + test_feats.batches,
        train_feats.chunks + test_feats.chunks,
    )
    if len(everything):
        test_mask = np.array([False] * len(train_feats) + [True] * len(test_feats))
        plots["scatter"] = plot_scatter(everything, test_mask)

    probe: dict[str, Any] = {"train_batches": train, "test_batches": test}
    if not train or not test:
        probe["why"] = (
            "Linear probe not computed: it needs Training and Test batches in PCA version "
            f"{version}; its sample holds {len(train)} Training and {len(test)} Test batch(es). A batch is "
            "Test data when its id holds the token 'test' (for example test-2026-01-01)."
        )
    elif len(set(train_feats.labels)) < 2:
        probe["why"] = "Linear probe not computed: the Training batches hold fewer than two labels."
    else:
        probe["pca"] = linear_probe(
            train_feats.matrix, train_feats.labels, test_feats.matrix, test_feats.labels
        )
        train_emb = vectors_of(sample, ~is_test, "embedding", EMBEDDING_DIM)
        test_emb = vectors_of(sample, is_test, "embedding", EMBEDDING_DIM)
        probe["full"] = linear_probe(train_emb.matrix, train_emb.labels, test_emb.matrix, test_emb.labels)
        log.info(
            "linear probe top-1: PCA (%d-d) %s, full embeddings (1280-d) %s, on %d test images",
            k,
            probe["pca"]["accuracy"],
            probe["full"]["accuracy"],
            probe["pca"]["test_rows"],
        )

    steps = _steps(catalog, plan["run_prefix"], summary)
    plots["steps"] = plot_steps(steps)
    new = set(plan["batches"])
    reasons: dict[str, int] = {}
    for b in new:
        for reason, n in ((results.get(b) or {}).get("reject_reasons") or {}).items():
            reasons[reason] = reasons.get(reason, 0) + n
    batches = [
        {
            "batch_id": b,
            "split": "test" if is_test_batch(b, s.test_batch_pattern) else "train",
            "files": (results.get(b) or {}).get("files"),
            "embedded": (results.get(b) or {}).get("embedded"),
            "rejected": (results.get(b) or {}).get("rejected"),
            "labels": (results.get(b) or {}).get("labels"),
            "new": True,
        }
        for b in sorted(new)
    ]
    return {
        "run_id": plan["run_id"],
        "compute": plan["params"].get("compute"),
        "engine": plan["params"].get("engine"),
        "model_id": plan.get("model_id"),
        "summary": summary,
        "pca_meta": meta,
        "batches": batches,
        "earlier_batches": len([b for b in results if b not in new]) or len(set(sample_batches) - new),
        "sample": {"rows": 0 if sample is None else sample.num_rows, "batches": len(sample_batches)},
        "reject_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "reject_examples": reject_examples(catalog, {b: results.get(b) or {} for b in new}),
        "steps": steps,
        "plots": plots,
        "scatter_rows": len(everything),
        "probe": probe,
        "fit_saw_test": meta.get(
            "fit_saw_test", any(is_test_batch(b, s.test_batch_pattern) for b in meta.get("fit_batches", []))
        ),
        "source": layout.uri(plan["run_prefix"]),
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_report(catalog: Catalog, plan: dict[str, Any], summary: dict[str, Any], s: Settings) -> str:
    """Render the run's page and put it at reports/RUN.html; returns its s3:// URI. The probe's numbers
    also go to runs/RUN/report.json, for anyone who wants them without parsing HTML."""
    ctx = build(catalog, plan, summary, s)
    key = catalog.layout.report_key(plan["run_id"])
    catalog.hook.load_string(render(ctx), key, catalog.bucket, replace=True)
    catalog.write_json(
        f"{plan['run_prefix']}report.json",
        {
            "report": catalog.layout.uri(key),
            "probe": {k: v for k, v in ctx["probe"].items() if k != "why"},
            "probe_note": ctx["probe"].get("why"),
            "plots": sorted(k for k, v in ctx["plots"].items() if v),
        },
    )
    return catalog.layout.uri(key)
