"""``segfactory inspect DATASET --html OUT``: one static, self-contained HTML file.

No server and no external file: thumbnails are data URIs, charts are inline SVG, the filters are
a few lines of JavaScript over a JSON block, so the file works opened from disk or from an
object-store website. The dataset is paged through shard by shard and row group by row group:
masks (and score columns) of every kept row feed the class frequencies and the histograms,
and only the first ``cards`` rows keep a thumbnail.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import Counter
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from core import schema as S
from core import storage
from core.storage import Location

THUMB = 128


def _data_uri(arr: np.ndarray) -> str:
    """A thumbnail as a JPEG data URI (a PNG of a photo-like image is ~5x larger: the page of
    120 cards would weigh tens of MB)."""
    img = Image.fromarray(arr).convert("RGB")
    img.thumbnail((THUMB, THUMB), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _decode(data: bytes, rgb: bool) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB") if rgb else img)


def _card(sample_id: str, image: np.ndarray, mask: np.ndarray, palette: np.ndarray, names: list[str],
          extra: dict[str, Any]) -> dict[str, Any]:
    from pipelines.report import overlay

    present = [int(c) for c in np.unique(mask) if int(c) != S.IGNORE_INDEX and int(c) < len(names)]
    return {"id": sample_id, "image": _data_uri(image), "overlay": _data_uri(overlay(image, mask, palette)),
            "classes": [names[c] for c in present], **extra}


class _Stats:
    """Per-class pixel counts and score values, accumulated a row group at a time."""

    def __init__(self, n_classes: int):
        self.pixels = np.zeros(n_classes, np.int64)
        self.scores: dict[str, list[float]] = {}

    def add_mask(self, mask: np.ndarray) -> None:
        valid = mask[mask != S.IGNORE_INDEX].ravel()
        self.pixels += np.bincount(valid, minlength=len(self.pixels))[: len(self.pixels)]

    def add_scores(self, table) -> None:
        for name in table.column_names:
            if name.startswith(S.SCORE_PREFIX):
                values = [v for v in table.column(name).to_pylist() if v is not None and np.isfinite(v)]
                self.scores.setdefault(name, []).extend(values)

    def frequencies(self) -> np.ndarray:
        total = self.pixels.sum()
        return self.pixels / total if total else self.pixels.astype(float)


def dataset_report(dataset: Location | str | os.PathLike, cards: int = 120, source_rows: int = 100) -> dict[str, Any]:
    """What the page shows of a segfactory dataset (cards, rejected rows, frequencies, scores)."""
    from pipelines.report import read_manifest

    root = storage.resolve(dataset, "DATASET")
    m = read_manifest(root)
    names, palette = list(m["classes"]), np.array(m["palette"], np.uint8)
    stats, out_cards = _Stats(len(names)), []
    from pipelines.commits import shard_files_to_read

    for f in shard_files_to_read(root):
        pf = pq.ParquetFile(f.path, filesystem=f.fs)
        for g in range(pf.num_row_groups):
            light = [c for c in pf.schema_arrow.names if c != S.IMAGE]
            table = pf.read_row_group(g, columns=light)
            stats.add_scores(table)
            want = cards - len(out_cards)
            images = pf.read_row_group(g, columns=[S.IMAGE]).column(S.IMAGE).to_pylist()[:want] if want > 0 else []
            for i, row in enumerate(table.to_pylist()):
                mask = _decode(row[S.MASK], rgb=False)
                stats.add_mask(mask)
                if i < len(images):
                    scores = {k: round(v, 4) for k, v in row.items() if k.startswith(S.SCORE_PREFIX) and v is not None}
                    out_cards.append(_card(row[S.SAMPLE_ID], _decode(images[i], True), mask, palette, names,
                                           {"method": row.get(S.METHOD, ""), "source": row.get(S.SOURCE_ID, ""),
                                            "caption": row.get(S.CAPTION, ""), "scores": scores}))
    source_freq = _source_frequencies(m, len(names), source_rows)
    return {"title": f"segfactory dataset {root}", "classes": names, "palette": palette.tolist(),
            "cards": out_cards, "rejected": rejected_rows(root), "counts": _counts(m),
            "frequencies": stats.frequencies().tolist(), "source_frequencies": source_freq,
            "scores": stats.scores}


def _counts(m: dict[str, Any]) -> dict[str, Any]:
    return {"rows": m.get("rows"), "rejected": m.get("rejected_rows"), "shards": len(m.get("shards", [])),
            "per method": m.get("rows_per_method", {}), "drops per reason": m.get("drops_per_reason", {})}


def rejected_rows(dataset: Location | str | os.PathLike, limit: int = 60,
                  thumbnails: bool = True) -> list[dict[str, Any]]:
    """Rejected rows with reason and path; a thumbnail where the row kept a readable image."""
    root = storage.resolve(dataset, "DATASET")
    out: list[dict[str, Any]] = []
    for f in storage.listdir(root / "rejected", ".parquet"):
        pf = pq.ParquetFile(f.path, filesystem=f.fs)
        wanted = (S.SAMPLE_ID, S.DROP_REASON, S.SOURCE_PATH) + ((S.IMAGE,) if thumbnails else ())
        cols = [c for c in wanted if c in pf.schema_arrow.names]
        for g in range(pf.num_row_groups):
            for row in pf.read_row_group(g, columns=cols).to_pylist():
                rec = {"id": row[S.SAMPLE_ID], "reason": row.get(S.DROP_REASON) or "",
                       "path": row.get(S.SOURCE_PATH) or "", "image": ""}
                try:
                    if row.get(S.IMAGE):
                        rec["image"] = _data_uri(_decode(row[S.IMAGE], True))
                except Exception:  # noqa: BLE001 - a corrupt image is often why the row was rejected
                    rec["image"] = ""
                out.append(rec)
                if len(out) >= limit:
                    return out
    return out


def _source_frequencies(m: dict[str, Any], n: int, rows: int) -> list[float] | None:
    """Class pixel shares of the first ``rows`` source masks (None when the source is not
    readable from here or has no masks)."""
    src = (m.get("config") or {}).get("source") or {}
    if not src.get("path") or src.get("format") == "captions":
        return None
    try:
        return source_report(src["path"], src["format"], src.get("split"), cards=0, rows=rows)["frequencies"][:n]
    except Exception:  # noqa: BLE001 - the source may live elsewhere: the page says so
        return None


def source_report(path: str, fmt: str, split: str | None = None, cards: int = 120, rows: int = 400) -> dict[str, Any]:
    """What the page shows of a source dataset (VOC, ADE20K, folder, Parquet): cards of its
    first rows, its class frequencies over ``rows`` masks, the rows its index rejected."""
    from actors.colormap import voc_palette
    from pipelines.source_index import index_source

    index = index_source(path, fmt, split=split)
    names = list(index.classes)
    palette = voc_palette(max(len(names), 1))
    stats, out_cards = _Stats(len(names)), []
    for row in index.table.slice(0, rows).to_pylist():
        try:
            image, mask = index.load(row)
        except Exception:  # noqa: BLE001 - a bad row is listed, never fatal for a report
            continue
        if mask is None:
            continue
        stats.add_mask(mask)
        if len(out_cards) < cards:
            out_cards.append(_card(row[S.SOURCE_ID], image, mask, palette, names,
                                   {"method": "source", "source": row[S.SOURCE_ID], "caption": row.get(S.CAPTION) or "",
                                    "scores": {}}))
    rejected = [{"id": sid, "reason": reason, "path": where, "image": ""} for sid, where, reason in index.problems[:60]]
    return {"title": f"source dataset {path} ({fmt})", "classes": names, "palette": palette.tolist(),
            "cards": out_cards, "rejected": rejected, "frequencies": stats.frequencies().tolist(),
            "source_frequencies": None, "scores": {},
            "counts": {"rows": index.table.num_rows, "rejected": len(index.problems)}}


# --- rendering ------------------------------------------------------------------------------------


def _histogram_svg(name: str, values: list[float], bins: int = 20) -> str:
    counts, edges = np.histogram(np.asarray(values, float), bins=bins)
    top = max(int(counts.max()), 1)
    bars = "".join(f'<rect x="{i * 15}" y="{100 - 100 * c / top:.1f}" width="13" height="{100 * c / top:.1f}">'
                   f"<title>{edges[i]:.3f}-{edges[i + 1]:.3f}: {c}</title></rect>" for i, c in enumerate(counts))
    return (f'<figure><figcaption>{html.escape(name)} ({len(values)} rows, {edges[0]:.3f} to {edges[-1]:.3f})'
            f'</figcaption><svg class="hist" viewBox="0 0 {bins * 15} 100" width="{bins * 15}" height="100">'
            f"{bars}</svg></figure>")


def _frequency_table(names: list[str], freq: list[float], source: list[float] | None, palette: list) -> str:
    rows = []
    for i, name in enumerate(names):
        f, s = freq[i] if i < len(freq) else 0.0, source[i] if source and i < len(source) else None
        if f == 0 and not s:
            continue
        color = "rgb({},{},{})".format(*palette[i]) if i < len(palette) else "#888"
        bar = f'<span class="bar" style="width:{200 * f:.0f}px;background:{color}"></span>'
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{bar} {f:.3f}</td><td>"
                    + (f"{s:.3f}" if s is not None else "-") + "</td></tr>")
    return ("<table class=\"freq\"><tr><th>class</th><th>pixel share (this dataset)</th><th>source</th></tr>"
            + "".join(rows) + "</table>")


PAGE_JS = """
const data = JSON.parse(document.getElementById('data').textContent);
const sel = (id) => document.getElementById(id);
function options(id, values) {
  const s = sel(id);
  for (const v of [...new Set(values)].sort()) { const o = document.createElement('option'); o.value = v; o.textContent = v; s.appendChild(o); }
}
options('f-class', data.cards.flatMap(c => c.classes));
options('f-method', data.cards.map(c => c.method));
options('f-source', data.cards.map(c => c.source));
const grid = sel('cards');
for (const c of data.cards) {
  const d = document.createElement('div');
  d.className = 'card';
  d.dataset.classes = JSON.stringify(c.classes); d.dataset.method = c.method; d.dataset.source = c.source;
  d.innerHTML = `<img src="${c.image}" alt="image"><img src="${c.overlay}" alt="mask overlay">` +
    `<div class="id"></div><div class="meta"></div>`;
  d.querySelector('.id').textContent = c.id;
  d.querySelector('.meta').textContent = [c.method, c.classes.join(', '), Object.entries(c.scores).map(([k, v]) => k + '=' + v).join(' ')].filter(Boolean).join(' | ');
  d.title = c.caption || '';
  grid.appendChild(d);
}
function apply() {
  const cls = sel('f-class').value, m = sel('f-method').value, s = sel('f-source').value;
  let shown = 0;
  for (const d of grid.children) {
    const ok = (!cls || JSON.parse(d.dataset.classes).includes(cls)) && (!m || d.dataset.method === m) && (!s || d.dataset.source === s);
    d.style.display = ok ? '' : 'none';
    shown += ok ? 1 : 0;
  }
  sel('shown').textContent = shown + ' of ' + grid.children.length + ' cards';
}
for (const id of ['f-class', 'f-method', 'f-source']) sel(id).addEventListener('change', apply);
apply();
"""

PAGE_CSS = """
body{font:14px system-ui,sans-serif;margin:1em 2em;color:#222}
.cards{display:flex;flex-wrap:wrap;gap:8px}.card{border:1px solid #ccc;padding:4px;width:264px}
.card img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;background:#eee}
.id{font:11px monospace;word-break:break-all}.meta{font-size:11px;color:#555}
.bar{display:inline-block;height:10px}.hist rect{fill:#4a7bd0}figure{display:inline-block;margin:0 1em 1em 0}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}
.rej img{width:64px;height:64px;object-fit:contain}
"""


def render_html(report: dict[str, Any]) -> str:
    """The page of a :func:`dataset_report` / :func:`source_report` dict."""
    e = html.escape
    counts = "".join(f"<tr><th>{e(k)}</th><td>{e(json.dumps(v) if isinstance(v, dict) else str(v))}</td></tr>"
                     for k, v in report["counts"].items())
    hist = "".join(_histogram_svg(k, v) for k, v in sorted(report["scores"].items()) if v) or "<p>no score columns</p>"
    rej = "".join(f"<tr><td>{e(r['id'])}</td><td>{e(r['reason'])}</td><td>{e(r['path'])}</td><td>"
                  + (f'<img src="{r["image"]}" alt="rejected">' if r["image"] else "") + "</td></tr>"
                  for r in report["rejected"])
    payload = json.dumps({"cards": report["cards"]}).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(report['title'])}</title>
<link rel="icon" href="data:,"><style>{PAGE_CSS}</style></head><body>
<h1>{e(report['title'])}</h1>
<table>{counts}</table>
<h2>Samples</h2>
<p>class <select id="f-class"><option value="">all</option></select>
method <select id="f-method"><option value="">all</option></select>
source <select id="f-source"><option value="">all</option></select> <span id="shown"></span></p>
<div id="cards" class="cards"></div>
<h2>Class pixel frequencies</h2>
{_frequency_table(report['classes'], report['frequencies'], report['source_frequencies'], report['palette'])}
<h2>Score histograms</h2>
{hist}
<h2>Rejected rows ({len(report['rejected'])} shown)</h2>
<table class="rej"><tr><th>id</th><th>reason</th><th>path</th><th>image</th></tr>{rej}</table>
<script type="application/json" id="data">{payload}</script>
<script>{PAGE_JS}</script>
</body></html>
"""


def sweep_html(sweep: Location | str | os.PathLike) -> str:
    """A scaling sweep's page: every trial of results.csv and the plot, inline."""
    import csv

    root = storage.resolve(sweep, "--report")
    rows = list(csv.DictReader(io.StringIO(storage.read_text(root / "results.csv"))))
    head = list(rows[0]) if rows else []
    e = html.escape
    table = ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{e(r[h] or '')}</td>" for h in head) + "</tr>" for r in rows) + "</table>")
    plot = root / "scaling.png"
    img = (f'<img alt="scaling" src="data:image/png;base64,{base64.b64encode(storage.read_bytes(plot)).decode()}">'
           if storage.is_file(plot) else "")
    fit = storage.read_text(root / "fit.json") if storage.is_file(root / "fit.json") else "{}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>sweep {e(str(root))}</title>'
            f'<link rel="icon" href="data:,"><style>{PAGE_CSS}</style></head><body><h1>sweep {e(str(root))}</h1>'
            f"<p>{len(rows)} trials</p>{img}<h2>Trials</h2>{table}<h2>fit.json</h2><pre>{e(fit)}</pre></body></html>")


def write_html(page: str, out: str | os.PathLike) -> Location:
    loc = storage.resolve(out, "--html")
    storage.write_bytes(loc, page.encode("utf-8"))
    return loc


def class_counts(report: dict[str, Any]) -> Counter:
    """How many cards show each class (what the class filter leaves)."""
    return Counter(c for card in report["cards"] for c in card["classes"])
