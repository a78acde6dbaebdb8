"""Committed checkpoints: the record a commit leaves beside a checkpoint, and the check every reader makes before
loading one (DESIGN.md, "Run store"). Plain hashing and JSON, no torch: the run store and the CLI use it too.
"""

from __future__ import annotations

import hashlib
import json

from service.spec import Spec

COMMIT_MARKER = "COMMITTED"


class CheckpointError(ValueError):
    """A checkpoint that must not be used: torn, corrupt, of another spec, or without a valid commit record."""


def spec_identity(spec: Spec) -> dict:
    """What a checkpoint records of the spec it was trained under: the hash, and the fields behind it, so that a
    mismatch can be told field by field."""
    return {"spec_hash": spec.model_hash(), "spec_fields": json.dumps(spec.model_fields_that_matter(), sort_keys=True)}


def spec_mismatch(recorded: dict, spec: Spec) -> str | None:
    """None when `recorded` (a payload or a commit record) belongs to `spec`, else which fields differ."""
    if recorded.get("spec_hash") == spec.model_hash():
        return None
    try:
        fields = json.loads(recorded["spec_fields"])
        current = spec.model_fields_that_matter()
        diffs = [f"{k}: {fields[k]} -> {current[k]}" for k in current if k in fields and fields[k] != current[k]]
    except (KeyError, TypeError, ValueError):
        diffs = []
    return "; ".join(diffs) or f"spec hash {recorded.get('spec_hash')!r} is not {spec.model_hash()!r}"


def commit_record(data: bytes, spec: Spec, committed_at: float) -> dict:
    """The COMMITTED marker's content: what a reader checks the checkpoint's bytes and spec against."""
    return {"committed_at": committed_at, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
            **spec_identity(spec)}


def parse_commit_record(text: bytes, where: str) -> dict:
    try:
        record = json.loads(text)
        if not (isinstance(record, dict) and isinstance(record.get("sha256"), str)
                and isinstance(record.get("size"), int)):
            raise ValueError("no sha256 and size")
    except ValueError as e:
        raise CheckpointError(f"{where}: the commit record is not valid ({str(e).splitlines()[0]})") from None
    return record


def verify_commit(data: bytes, record: dict, spec: Spec, where: str) -> None:
    """Refuse checkpoint bytes that are not the ones committed, or were committed under another spec."""
    if len(data) != record["size"]:
        raise CheckpointError(f"{where}: checkpoint is {len(data)} bytes, the commit recorded {record['size']}")
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise CheckpointError(f"{where}: checkpoint sha256 does not match the commit record (corrupt)")
    mismatch = spec_mismatch(record, spec)
    if mismatch:
        raise CheckpointError(f"{where}: checkpoint was committed under another spec ({mismatch})")


def read_committed(fs, checkpoint_path: str, spec: Spec, where: str) -> bytes:
    """A committed checkpoint's bytes, verified against the COMMITTED marker beside it."""
    marker = f"{checkpoint_path.rsplit('/', 1)[0]}/{COMMIT_MARKER}"
    try:
        record = parse_commit_record(fs.cat_file(marker), where)
        data = fs.cat_file(checkpoint_path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{where}: {e.filename or 'a file'} is missing") from None
    verify_commit(data, record, spec, where)
    return data
