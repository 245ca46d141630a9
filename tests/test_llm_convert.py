"""``omnidiff llm convert`` parses the GGUF once (issue 18 item 5): ``gguf_parsed_once`` hands transformers
one ``gguf.GGUFReader`` per file. The full conversion against transformers' own three parses is
benchmarks/llm_convert.py (same weights digest, tokenizer files and token ids).

.venv/bin/pytest tests/test_llm_convert.py -x -q
"""

from __future__ import annotations

import numpy as np
import pytest

from omnidiff.models.llm_folders import gguf_parsed_once


@pytest.fixture
def small_gguf(tmp_path):
    """A GGUF file with a string vocabulary and two tensors, written by gguf-py itself."""
    import gguf

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), arch="gemma3")
    writer.add_block_count(2)
    writer.add_token_list([f"tok{i}" for i in range(300)] + ["左", "🙂"])
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _summary(reader) -> tuple:
    tokens = reader.fields["tokenizer.ggml.tokens"]
    vocab = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    return vocab, {t.name: np.array(t.data).tolist() for t in reader.tensors}


def test_each_file_is_parsed_once_inside_and_every_time_outside(small_gguf, tmp_path):
    import gguf

    original = gguf.GGUFReader
    fresh = _summary(original(small_gguf))
    assert fresh[0][-2:] == ["左", "🙂"] and fresh[1]["token_embd.weight"] == np.arange(12).reshape(3, 4).tolist()
    other = tmp_path / "other.gguf"
    other.write_bytes(small_gguf.read_bytes())
    with gguf_parsed_once() as readers:
        first = gguf.GGUFReader(small_gguf)
        assert gguf.GGUFReader(str(small_gguf)) is first  # the same file by another spelling: the same parse
        assert gguf.GGUFReader(other) is not first  # another file: its own parse
        assert len(readers) == 2 and _summary(first) == fresh
    assert gguf.GGUFReader is original
    assert _summary(gguf.GGUFReader(small_gguf)) == fresh


def test_transformers_reads_the_same_metadata_from_the_shared_parse(small_gguf):
    import gguf
    from transformers.modeling_gguf_pytorch_utils import read_field

    alone = read_field(gguf.GGUFReader(small_gguf), "tokenizer.ggml.tokens")
    with gguf_parsed_once():
        twice = [read_field(gguf.GGUFReader(small_gguf), "tokenizer.ggml.tokens") for _ in range(2)]
    assert twice[0] == twice[1] == alone and len(alone) == 302
