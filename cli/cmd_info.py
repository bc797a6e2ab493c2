"""``snapferry info``: the repository's size, dedup and compression."""

from __future__ import annotations

import argparse
from typing import Any

from snapferry.cli.common import epilog, open_repo
from snapferry.cli.output import emit_json, human_bytes, print_fields
from snapferry.cli.shapes import restore_point_doc

HELP = "repository summary: size, dedup and compression"
EXAMPLES = """
  snapferry info --repo /backup/repo
  snapferry info --json | jq .total_ratio
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("info", help=HELP, description=HELP + ".", epilog=epilog(EXAMPLES))
    p.set_defaults(func=run)


def _ratio(x: Any) -> str:
    return f"{x:.2f}x" if isinstance(x, int | float) else "-"


def run(args: argparse.Namespace) -> int:
    from snapferry.engine.verify import repo_info

    repo = open_repo(args)
    info = repo_info(repo)
    if args.json:
        doc = dict(info)
        doc["repository"] = doc.pop("path")
        doc["restore_points"] = [restore_point_doc(m) for m in repo.list_backups()]
        data = {p["backup_id"]: p.get("data_bytes") for p in info["restore_points"]}
        for p in doc["restore_points"]:
            p["data_bytes"] = data.get(p["backup_id"])
        emit_json(doc)
        return 0
    points = info["restore_points"]
    series = len({p["vm"] for p in points})
    print_fields([
        ("repository", info["path"]),
        ("id", info["id"]),
        ("format", info.get("format")),
        ("encryption", info.get("encryption", "none")),
        ("chunk size", f"{human_bytes(info['chunk_size'])}, zstd level {info['zstd_level']}"),
        ("restore points", f"{len(points)} in {series} series"),
        ("chunks", f"{info['chunks']}: {human_bytes(info['chunk_bytes_stored'])} stored, "
                   f"{human_bytes(info['chunk_bytes_raw'])} before compression"),
        ("size on disk", human_bytes(info["size_on_disk"])),
        ("logical data", f"{human_bytes(info['data_bytes'])} in "
                         f"{human_bytes(info['logical_bytes'])} of disks"),
        ("dedup ratio", _ratio(info.get("dedup_ratio"))),
        ("compression ratio", _ratio(info.get("compression_ratio"))),
        ("total ratio", _ratio(info.get("total_ratio"))),
    ])
    left = info.get("leftovers") or {}
    if any(left.values()):
        print_fields([(
            "unreferenced",
            f"{left['packs']} packs ({human_bytes(left['pack_bytes'])}), "
            f"{left['index_files']} index files ({human_bytes(left['index_bytes'])}), "
            f"{left['temp_files']} temp files ({human_bytes(left['temp_bytes'])}): "
            "left by interrupted backups",
        )])
    for bad in info.get("damaged_restore_points") or []:
        print_fields([("damaged", f"restore point {bad['backup_id']}: {bad['problem']}")])
    return 0
