"""Commit records: a checkpoint is loaded only when its bytes and spec are the ones committed."""

from __future__ import annotations

import json

import pytest
from fsspec.implementations.local import LocalFileSystem

from service.spec import parse_spec
from workers.commit import CheckpointError, commit_record, read_committed, verify_commit

SPEC = parse_spec("run: r\ndataset: d\nstorage: s\nresolution: 16\nfmap_max: 16\n")
DATA = bytes(range(256)) * 40


def test_a_record_verifies_its_own_bytes_and_spec():
    record = commit_record(DATA, SPEC, 1.0)
    assert (record["size"], len(record["sha256"])) == (len(DATA), 64)
    verify_commit(DATA, record, SPEC, "phase 00")


@pytest.mark.parametrize(
    "data, spec_yaml, message",
    [
        (DATA[:-1], "", f"phase 00: checkpoint is {len(DATA) - 1} bytes, the commit recorded {len(DATA)}"),
        (DATA[:100] + b"\x00" + DATA[101:], "", "phase 00: checkpoint sha256 does not match the commit record"),
        (DATA, "fmap_max: 32\nlatent_size: 64\n", "committed under another spec (latent_size: 512 -> 64; fmap_max: 16 -> 32)"),
    ],
)
def test_torn_flipped_or_foreign_checkpoints_are_refused(data, spec_yaml, message):
    spec = parse_spec("run: r\ndataset: d\nstorage: s\nresolution: 16\nfmap_max: 16\n" + spec_yaml)
    with pytest.raises(CheckpointError) as e:
        verify_commit(data, commit_record(DATA, SPEC, 1.0), spec, "phase 00")
    assert message in str(e.value)


@pytest.mark.parametrize("marker", ["{not json", json.dumps({"committed_at": 1.0}), "[]"])
def test_a_commit_record_without_checksum_is_refused(tmp_path, marker):
    (tmp_path / "checkpoint.pt").write_bytes(DATA)
    (tmp_path / "COMMITTED").write_text(marker)
    with pytest.raises(CheckpointError, match="the commit record is not valid"):
        read_committed(LocalFileSystem(), str(tmp_path / "checkpoint.pt"), SPEC, "phase 00")


def test_read_committed_returns_verified_bytes_or_names_what_is_missing(tmp_path):
    (tmp_path / "COMMITTED").write_text(json.dumps(commit_record(DATA, SPEC, 1.0)))
    with pytest.raises(CheckpointError, match="checkpoint.pt is missing"):
        read_committed(LocalFileSystem(), str(tmp_path / "checkpoint.pt"), SPEC, "phase 00")
    (tmp_path / "checkpoint.pt").write_bytes(DATA)
    assert read_committed(LocalFileSystem(), str(tmp_path / "checkpoint.pt"), SPEC, "phase 00") == DATA
