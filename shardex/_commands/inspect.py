"""`shardex inspect OUT`: what an export contains, read from model.onnx and the manifest only.

The model is loaded with ``load_external_data=False``: a 100 GB export inspects in a second.
"""

from __future__ import annotations

import argparse
import collections
import os

import onnx
from google.protobuf.message import DecodeError

from shardex._commands import EXIT_CODES_HELP, EXIT_OK, UsageError, add_output_flags, load_export, print_json
from shardex._dtypes import onnx_type_name
from shardex._output import model_files, recorded_digest
from shardex._report import SOURCE_KINDS, human_bytes, worst_output_diff

EXAMPLES = """\
examples:
  shardex inspect out/llama
  shardex inspect out/llama --json | jq '.functions[].calls'"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show what an export contains, without loading its weights",
        description="Print an export's inputs and outputs (with symbolic dims), its block functions and\n"
        "where they are called, its shards and sizes, and the manifest summary. Reads no weights.",
        epilog=f"{EXAMPLES}\n\n{EXIT_CODES_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output", metavar="OUT", help="the output directory of `shardex export`")
    add_output_flags(parser, json_help="print the description as JSON on stdout")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    manifest = load_export(args.output)
    models = []
    for entry in model_files(manifest):
        path = os.path.join(args.output, entry["file"])
        try:
            models.append((entry, onnx.load(path, load_external_data=False)))
        except (OSError, DecodeError) as e:
            raise UsageError(f"cannot read {path} ({e}); export the model again with --overwrite.") from None
    description = describe(models, manifest, args.output)
    if args.json:
        print_json(description)
    else:
        print(format_description(description))
    return EXIT_OK


def describe(models: list[tuple[dict, onnx.ModelProto]], manifest: dict, output_dir: str) -> dict:
    """The export as plain data: each ONNX file's signature, functions and their calls (the
    first file's at the top level, every file's under ``models``), shards, manifest summary."""
    files = [_describe_file(entry, model, manifest) for entry, model in models]
    tensors = collections.defaultdict(set)  # per shard, the tensors any file reads from it
    for _, model in models:
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                tensors[_external_location(t)].add(t.name)
    verification = manifest.get("verification")
    return {
        "output_dir": os.path.abspath(output_dir),
        "format": manifest["format"],
        "status": manifest["status"],
        "created": manifest.get("created"),
        "source": manifest["source"],
        "parameters": manifest["parameters"],
        "code": _code_requests(manifest),
        **files[0],
        "models": files,
        "shards": [
            {
                "file": s["file"],
                "bytes": s["nbytes"],
                "tensors": len(tensors[s["file"]]),
                "digest": recorded_digest(s),
                "present": _present(os.path.join(output_dir, s["file"]), s["nbytes"]),
            }
            for s in manifest["shards"]
        ],
        "timings": manifest["timings"],
        "verified": None if verification is None else verification["passed"],
        "max_abs_diff": worst_output_diff(manifest),
        "blocks_verified": len(verification["blocks"]) if verification else 0,
    }


def _describe_file(entry: dict, model: onnx.ModelProto, manifest: dict) -> dict:
    """One ONNX file: its signature, size of graph, block functions and where they are called."""
    graph = model.graph
    groups = {g["function"]: g for g in entry.get("groups") or manifest["plan"]["groups"]}
    return {
        "model": {k: entry[k] for k in ("file", "bytes", "sha256")},
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": [_value(v) for v in graph.input],
        "outputs": [_value(v) for v in graph.output],
        "nodes": len(graph.node),
        "top_ops": collections.Counter(n.op_type for n in graph.node).most_common(5),
        "initializers": len(graph.initializer),
        "functions": [_function(f, graph, groups.get(f.name)) for f in model.functions],
    }


def _code_requests(manifest: dict) -> list[str]:
    """What code the manifest says the export ran: reported, never run by inspect or verify."""
    requests = []
    if manifest["source"]["kind"] == "factory":
        location = manifest["source"]["location"]
        requests.append(f"factory {location} (verify imports it only with --factory {location})")
    if manifest.get("options", {}).get("trust_remote_code"):
        requests.append("the checkpoint's own code (verify runs it only with --trust-remote-code)")
    return requests


def _external_location(tensor: onnx.TensorProto) -> str:
    return next(e.value for e in tensor.external_data if e.key == "location")


def _present(path: str, nbytes: int) -> bool:
    return os.path.isfile(path) and os.path.getsize(path) == nbytes


def _value(value: onnx.ValueInfoProto) -> dict:
    return {"name": value.name, "type": _type_text(value.type)}


def _type_text(type_proto: onnx.TypeProto) -> str:
    """``int64[batch, sequence]``; '?' for a dim with neither a name nor a size."""
    if not type_proto.HasField("tensor_type"):
        return "?"
    tensor = type_proto.tensor_type
    dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
    return f"{onnx_type_name(tensor.elem_type)}[{', '.join(dims)}]"


def _function(function: onnx.FunctionProto, graph: onnx.GraphProto, group: dict | None) -> dict:
    """One block function: its activation inputs (typed), weight count, nodes and call sites."""
    types = {v.name: _type_text(v.type) for v in function.value_info}
    activations = len(group["inputs"]) if group else len(function.input)
    calls = [n.name for n in graph.node if n.domain == function.domain and n.op_type == function.name]
    return {
        "name": f"{function.domain}.{function.name}",
        "class": group["class"] if group else None,
        "inputs": [{"name": n, "type": types.get(n, "?")} for n in function.input[:activations]],
        "weights": len(function.input) - activations,
        "outputs": [{"name": n, "type": types.get(n, "?")} for n in function.output],
        "nodes": len(function.node),
        "calls": calls,
    }


def format_description(d: dict) -> str:
    source = d["source"]
    lines = [
        f"{d['output_dir']}: {d['format']} export, {d['status']}, created {d['created']}",
        f"source      {source['location']} ({SOURCE_KINDS.get(source['kind'], source['kind'])}), "
        f"{d['parameters']:,} parameters",
        *_labelled("code", d["code"]),
    ]
    for file in d["models"]:
        lines += _file_lines(file)
    lines += _labelled(
        "shards",
        [
            f"{s['file']}  {human_bytes(s['bytes']):>9}  {s['tensors']:>4} tensors  {s['digest'][:23]}"
            + ("" if s["present"] else "  MISSING or wrong size")
            for s in d["shards"]
        ],
    )
    if d["verified"] is None:
        lines.append("verified    no (run `shardex verify`)")
    else:
        lines.append(
            f"verified    {'passed' if d['verified'] else 'FAILED'}: outputs max abs diff {d['max_abs_diff']:.2e}, "
            f"{d['blocks_verified']} blocks checked"
        )
    lines.append(f"total time  {d['timings']['total']:.1f}s")
    return "\n".join(lines)


def _file_lines(d: dict) -> list[str]:
    """One ONNX file's lines: signature, graph size, block functions."""
    lines = [
        f"model       {d['model']['file']} {human_bytes(d['model']['bytes'])}, IR {d['ir_version']}, opsets "
        + ", ".join(f"{k} {v}" for k, v in d["opsets"].items()),
        *_labelled("inputs", [f"{v['name']}: {v['type']}" for v in d["inputs"]]),
        *_labelled("outputs", [f"{v['name']}: {v['type']}" for v in d["outputs"]]),
        f"graph       {d['nodes']} nodes (most: {', '.join(f'{op} {n}' for op, n in d['top_ops'])}), "
        f"{d['initializers']} initializers",
    ]
    functions = []
    for f in d["functions"]:
        functions.append(
            f"{f['name']}: {f['nodes']} nodes, {f['weights']} weights, called {len(f['calls'])}x"
        )
        functions.append("  in:  " + ", ".join(f"{v['name']}: {v['type']}" for v in f["inputs"]))
        functions.append("  out: " + ", ".join(f"{v['name']}: {v['type']}" for v in f["outputs"]))
        functions.append("  at:  " + _abbreviated(f["calls"]))
    return lines + _labelled("functions", functions or ["none (blocks inlined into the graph)"])


def _labelled(label: str, items: list[str]) -> list[str]:
    """`label` in a 12-wide column on the first line, the other items aligned under it."""
    return [f"{label if i == 0 else '':<12}{item}" for i, item in enumerate(items)]


def _abbreviated(names: list[str], keep: int = 4) -> str:
    shown = ", ".join(names[:keep])
    return shown + (f", ... ({len(names) - keep} more)" if len(names) > keep else "")
