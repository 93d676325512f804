"""Readable renderings of one export, made from its manifest alone (weights are never read).

`write_report` writes ``report.html`` beside the model: stage timings, the per-block
verification chart (an inline SVG, log scale: block errors span decades, and one bad block must
stand out among 80 good ones), and the shards. `summarize` is the machine-readable result of the
CLI's ``--json``; `format_summary` is the text the CLI prints at the end of a command.
"""

from __future__ import annotations

import html
import math
import os

from shardex._output import REPORT_FILE, load_manifest, model_files, recorded_digest, write_atomic

STAGES = [
    ("plan", "plan"),
    ("capture_and_weights", "capture + weights"),
    ("stitch", "stitch"),
    ("verify", "verify"),
]
SOURCE_KINDS = {"hf": "Hugging Face checkpoint", "factory": "factory", "module": "in-memory module"}


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: int) -> str:
    """90448 -> '90.4K': parameter counts as people say them."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def worst_output_diff(manifest: dict) -> float | None:
    """The largest max-abs-diff over the model outputs; None when the export was not verified."""
    verification = manifest.get("verification")
    if not verification or not verification["outputs"]:
        return None
    return max(c["max_abs_diff"] for c in verification["outputs"])


def total_bytes(manifest: dict) -> int:
    return sum(m["bytes"] for m in model_files(manifest)) + sum(s["nbytes"] for s in manifest["shards"])


def summarize(manifest: dict, output_dir: str) -> dict:
    """The subset of the manifest a script needs, plus where the files are."""
    out = os.path.abspath(output_dir)
    groups = manifest["plan"]["groups"]
    return {
        "output_dir": out,
        "status": manifest["status"],
        "source": manifest["source"],
        "parameters": manifest["parameters"],
        "blocks": sum(len(g["members"]) for g in groups),
        "functions": [
            {"function": g["function"], "class": g["class"], "calls": len(g["members"])} for g in groups
        ],
        "bytes": total_bytes(manifest),
        "model": {**manifest["model"], "path": os.path.join(out, manifest["model"]["file"])},
        "models": [m | {"path": os.path.join(out, m["file"])} for m in model_files(manifest)],
        "shards": [
            {"file": s["file"], "nbytes": s["nbytes"], "digest": recorded_digest(s)}
            for s in manifest["shards"]
        ],
        "timings": manifest["timings"],
        "max_abs_diff": worst_output_diff(manifest),
        "verification": manifest["verification"],
        "report": os.path.join(out, REPORT_FILE),
    }


def source_name(source: dict) -> str:
    """How a user named the source: ``org/name@commit`` for a Hub id (its location is a
    snapshot directory of the HF cache), else its location."""
    hub = source.get("hub")
    return f"{hub['repo_id']}@{hub['commit'][:12]}" if hub else source["location"]


def format_summary(manifest: dict, output_dir: str, *, heading: str) -> str:
    """The end-of-command summary: model, size, blocks, files, stage times, verification."""
    out = os.path.abspath(output_dir)
    source = manifest["source"]
    files = model_files(manifest)
    # an encoder-decoder's files: each one's block functions, prefixed by its file
    per_file = [(f"{m['file']}: ", m["groups"]) for m in files] if "models" in manifest else []
    named = per_file or [("", manifest["plan"]["groups"])]
    groups = [g for _, file_groups in named for g in file_groups]
    calls = sum(len(g["members"]) for g in groups)
    shard_bytes = sum(s["nbytes"] for s in manifest["shards"])
    models = " + ".join(f"{m['file']} {human_bytes(m['bytes'])}" for m in files)
    timings = manifest["timings"]
    stages = ", ".join(f"{label} {timings[key]:.1f}s" for key, label in STAGES if key in timings)
    distinct = "; ".join(
        prefix + ", ".join(f"{g['function']} x{len(g['members'])}" for g in file_groups)
        for prefix, file_groups in named
    )
    lines = [
        f"{heading} {source_name(source)} -> {out} ({manifest['status']})",
        f"  model       {manifest.get('model_class', '?')} from {source['location']} "
        f"({SOURCE_KINDS.get(source['kind'], source['kind'])})",
        f"  parameters  {manifest['parameters']:,} ({human_count(manifest['parameters'])})",
        f"  blocks      {calls} layers, {len(groups)} distinct: {distinct}",
        f"  size        {models} + "
        f"{len(manifest['shards'])} shard(s) {human_bytes(shard_bytes)} = {human_bytes(total_bytes(manifest))}",
        f"  time        {stages}; total {timings['total']:.1f}s",
        *_verification_lines(manifest.get("verification")),
        f"  files       {out}{os.sep}",
        f"  report      {os.path.join(out, REPORT_FILE)}",
    ]
    return "\n".join(lines)


def _shapes(shapes: list[list[int]], times: str = "x") -> str:
    """Input shapes, a run of equal ones (a KV cache's past tensors) as one "N × shape"."""
    runs: list[list] = []
    for shape in shapes:
        if runs and runs[-1][0] == shape:
            runs[-1][1] += 1
        else:
            runs.append([shape, 1])
    return ", ".join(
        (f"{count} × " if count > 1 else "") + times.join(map(str, shape)) for shape, count in runs
    )


def _verification_lines(verification: dict | None) -> list[str]:
    if verification is None:
        return ["  verified    no (exported with --no-verify; run `shardex verify`)"]
    shapes = _shapes(verification["input_shapes"], "x")
    checks = [*verification["outputs"], *verification["blocks"]]
    tolerance = (
        f", atol {min(c['atol'] for c in checks):g} (times each output's largest |value| above 1), "
        f"rtol {checks[0]['rtol']:g}"
        if checks
        else ""
    )
    lines = [
        f"  verified    {'passed' if verification['passed'] else 'FAILED'} in {verification['seconds']:.1f}s "
        f"on inputs {shapes} ({verification['method']}, {verification['compute_dtype']}{tolerance})"
    ]
    for check in verification["outputs"]:
        lines.append(f"              {check['name']}: {_diffs(check)}")
    blocks = verification["blocks"]
    if blocks:
        passed = sum(c["passed"] for c in blocks)
        worst = max(blocks, key=lambda c: _sortable(c["max_abs_diff"]))
        lines.append(
            f"              blocks: {passed}/{len(blocks)} passed; worst {worst['name']}: {_diffs(worst)}"
        )
    generation = verification.get("generation")
    if generation:
        verdict = "equal" if generation["tokens_equal"] else "DIFFER"
        lines.append(
            f"              generation: {generation['new_tokens']} next-token choices through the cache "
            f"{verdict} (batch {len(generation['torch_tokens'])}, one row left-padded); prompt logits "
            f"{_diffs(generation['prefill'])}; decode logits {_diffs(generation['decode'])}"
        )
    if verification["shard_hash_mismatches"]:
        lines.append(f"              digest changed: {', '.join(verification['shard_hash_mismatches'])}")
    return lines


def _diffs(check: dict) -> str:
    if check.get("error"):
        return check["error"]
    text = f"max abs diff {check['max_abs_diff']:.2e}, max rel diff {check['max_rel_diff']:.2e}"
    return text if check["passed"] else f"{text} FAILED"


def _sortable(value: float) -> float:
    return math.inf if math.isnan(value) else value


# --- HTML report -------------------------------------------------------------------------


def write_report(output_dir: str | os.PathLike) -> str:
    """Write ``report.html`` in `output_dir` from its manifest; returns the report's path."""
    out = os.path.abspath(os.fspath(output_dir))
    manifest = load_manifest(out)
    path = os.path.join(out, REPORT_FILE)
    write_atomic(path, _render_html(manifest))
    return path


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 2em; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: left; }
th { border-bottom: 1px solid #ccc; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #1a7f37; } .fail { color: #c62828; font-weight: bold; }
.bar { background: #5b8def; height: 10px; display: inline-block; }
code { font-size: 0.95em; }
"""


def _render_html(manifest: dict) -> str:
    source = manifest["source"]
    verification = manifest.get("verification")
    status_class = "pass" if manifest["status"] == "complete" else "fail"
    sections = [
        f"<h1>shardex export of <code>{_e(source_name(source))}</code></h1>",
        f"<p>Status: <span class='{status_class}'>{_e(manifest['status'])}</span>; "
        f"{manifest['parameters']:,} parameters ({human_count(manifest['parameters'])}); "
        f"{human_bytes(total_bytes(manifest))} on disk; created {_e(manifest.get('created', '?'))}.</p>",
        "<h2>Stage timings</h2>",
        _timings_table(manifest["timings"]),
        "<h2>Verification</h2>",
        _verification_html(verification),
        "<h2>Blocks</h2>",
        _groups_table(manifest["plan"]["groups"]),
        "<h2>Shards</h2>",
        _shards_table(manifest),
        "<h2>Options and versions</h2>",
        _key_values({**manifest["options"], **manifest["versions"]}),
    ]
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>shardex report: {_e(os.path.basename(source_name(source)))}</title>"
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _table(header: list[str], rows: list[list[str]], numeric: tuple[int, ...] = ()) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td class='n'>{c}</td>" if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _timings_table(timings: dict) -> str:
    total = timings["total"] or 1e-9
    rows = [
        [
            label,
            f"{timings[key]:.2f} s",
            f"<span class='bar' style='width:{300 * timings[key] / total:.0f}px'></span>",
        ]
        for key, label in STAGES
        if key in timings
    ]
    rows.append(["<b>total</b>", f"<b>{timings['total']:.2f} s</b>", ""])
    return _table(["stage", "time", ""], rows, numeric=(1,))


def _verification_html(verification: dict | None) -> str:
    if verification is None:
        return (
            "<p>Not verified (exported with <code>--no-verify</code>); run <code>shardex verify</code>.</p>"
        )
    verdict = (
        "<span class='pass'>passed</span>" if verification["passed"] else "<span class='fail'>FAILED</span>"
    )
    shapes = _shapes(verification["input_shapes"], "&times;")
    parts = [
        f"<p>{verdict} in {verification['seconds']:.1f} s: {_e(verification['method'])}, computing in "
        f"{_e(verification['compute_dtype'])}, on inputs of shape {shapes}.</p>",
        _checks_table(verification["outputs"]),
    ]
    generation = verification.get("generation")
    if generation:
        verdict = (
            "<span class='pass'>equal</span>"
            if generation["tokens_equal"]
            else "<span class='fail'>differ</span>"
        )
        parts.append(
            f"<p>Decoding through the KV cache, {generation['new_tokens']} next-token choices (ONNX "
            f"Runtime: a prompt with an empty past, then one token, then the other fed tokens at once, "
            f"each step's past the presents of the one before; PyTorch: one pass over the same "
            f"sequence): choices {verdict}.</p>"
        )
        rows = [
            [f"row {i}", " ".join(map(str, t)), " ".join(map(str, o))]
            for i, (t, o) in enumerate(zip(generation["torch_tokens"], generation["onnx_tokens"]))
        ]
        parts.append(_table(["prompt", "PyTorch tokens", "ONNX Runtime tokens"], rows))
        parts.append(_checks_table([generation["prefill"], generation["decode"]]))
    if verification["shard_hash_mismatches"]:
        names = ", ".join(_e(n) for n in verification["shard_hash_mismatches"])
        parts.append(f"<p class='fail'>Files whose digest changed since the export: {names}</p>")
    blocks = verification["blocks"]
    if blocks:
        parts.append(
            "<p>Max abs difference of each block's outputs, ONNX Runtime vs PyTorch on the same inputs "
            "(log scale; dashed line: atol; red: failed).</p>"
        )
        parts.append(block_chart_svg(blocks))
        failed = [c for c in blocks if not c["passed"]]
        if failed:
            parts.append("<p class='fail'>Failed blocks:</p>" + _checks_table(failed))
    return "\n".join(parts)


def _checks_table(checks: list[dict]) -> str:
    rows = [
        [
            f"<code>{_e(c['name'])}</code>",
            f"{c['max_abs_diff']:.3e}",
            f"{c['max_rel_diff']:.3e}",
            f"{c['atol']:g}",
            f"{c['rtol']:g}",
            "<span class='pass'>passed</span>" if c["passed"] else "<span class='fail'>FAILED</span>",
        ]
        for c in checks
    ]
    return _table(["check", "max abs diff", "max rel diff", "atol", "rtol", ""], rows, numeric=(1, 2))


def block_chart_svg(blocks: list[dict]) -> str:
    """A bar per block of its max abs diff on a log axis, the atol as a dashed line."""
    slot = min(720 / len(blocks), 40)  # a few blocks get bars, not slabs
    width, height, left, top, bottom = slot * len(blocks), 200, 60, 16, 34
    atol = blocks[0]["atol"]
    shown = [c["max_abs_diff"] for c in blocks if math.isfinite(c["max_abs_diff"]) and c["max_abs_diff"] > 0]
    shown += [atol] if atol > 0 else []
    low = max(math.floor(math.log10(min(shown))), -12) if shown else -12  # zero diffs sit at the floor
    high = max(math.ceil(math.log10(max(shown))), low + 1) if shown else low + 1

    def y(value: float) -> float:
        if not math.isfinite(value):
            return top
        fraction = (math.log10(max(value, 10.0**low)) - low) / (high - low)
        return top + height * (1 - min(max(fraction, 0.0), 1.0))

    label_every = math.ceil(len(blocks) / 24)
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{left + width + 70:.0f}' height='{top + height + bottom}' "
        "font-family='sans-serif' font-size='10' role='img' aria-label='max abs diff per block'>"
    ]
    for exponent in range(low, high + 1):
        ty = y(10.0**exponent)
        parts.append(f"<line x1='{left}' x2='{left + width}' y1='{ty:.1f}' y2='{ty:.1f}' stroke='#eee'/>")
        parts.append(f"<text x='{left - 4}' y='{ty + 3:.1f}' text-anchor='end'>1e{exponent}</text>")
    for i, check in enumerate(blocks):
        x = left + i * slot + slot * 0.1
        bar_top = y(check["max_abs_diff"])
        color = "#5b8def" if check["passed"] else "#c62828"
        title = f"{check['name']}: max abs diff {check['max_abs_diff']:.3e} ({'passed' if check['passed'] else 'FAILED'})"
        parts.append(
            f"<rect x='{x:.1f}' y='{bar_top:.1f}' width='{max(slot * 0.8, 1):.1f}' "
            f"height='{top + height - bar_top:.1f}' fill='{color}'><title>{_e(title)}</title></rect>"
        )
        if i % label_every == 0:
            parts.append(
                f"<text x='{x + slot * 0.4:.1f}' y='{top + height + 12}' text-anchor='middle'>"
                f"{_e(check['name'].rsplit('.', 1)[-1])}</text>"
            )
    if atol > 0:
        ay = y(atol)
        parts.append(
            f"<line x1='{left}' x2='{left + width}' y1='{ay:.1f}' y2='{ay:.1f}' stroke='#c62828' stroke-dasharray='4 3'/>"
        )
        parts.append(f"<text x='{left + width + 4:.1f}' y='{ay + 3:.1f}' fill='#c62828'>atol {atol:g}</text>")
    parts.append(f"<text x='{left + width / 2}' y='{top + height + 28}' text-anchor='middle'>block</text>")
    parts.append(
        f"<text transform='translate(10 {top + height / 2}) rotate(-90)' text-anchor='middle'>max abs diff</text>"
    )
    parts.append("</svg>")
    return "".join(parts)


def _groups_table(groups: list[dict]) -> str:
    rows = [
        [
            f"<code>{_e(g['function'])}</code>",
            _e(g["class"]),
            str(len(g["members"])),
            _e(", ".join(g["members"][:3]) + (", ..." if len(g["members"]) > 3 else "")),
            str(len(g["inputs"])),
            str(len(g["outputs"])),
        ]
        for g in groups
    ]
    return _table(["function", "class", "calls", "members", "inputs", "outputs"], rows, numeric=(2, 4, 5))


def _shards_table(manifest: dict) -> str:
    rows = [
        [
            f"<code>{_e(s['file'])}</code>",
            human_bytes(s["nbytes"]),
            str(s["tensors"]),
            f"{s['seconds']:.2f} s",
            f"<code>{_e(recorded_digest(s)[:23])}</code>",
        ]
        for s in manifest["shards"]
    ]
    rows += [
        [
            f"<code>{_e(model['file'])}</code>",
            human_bytes(model["bytes"]),
            "",
            "",
            f"<code>sha256:{_e(model['sha256'][:16])}</code>",
        ]
        for model in model_files(manifest)
    ]
    return _table(["file", "size", "tensors", "written in", "digest"], rows, numeric=(1, 2, 3))


def _key_values(values: dict) -> str:
    return _table(["", ""], [[_e(k), f"<code>{_e(v)}</code>"] for k, v in values.items()])
