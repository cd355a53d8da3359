"""Hostile GGUF inputs to convert: hyperparameters that abort llama.cpp, metadata and dims that overflow
Python, a broken chat template, and inputs that are not files at all. One line each, nothing left behind."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from arch_gguf import make_arch_gguf_pair
from cli_helpers import assert_one_line_error, cli

from epicode_edge.errors import BackendError, CheckpointError


def _refused(code, output, out, *expect):
    assert_one_line_error(code, output, *expect)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temporary bundle


def _convert(ft, inf, out, *extra):
    return cli("convert", "--finetuned", ft, "--inferior", inf, "--mu", "0.5", "-o", out, *extra)


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])  # written here / by llama.cpp's quantizer
def test_block_count_beyond_llama_cpp_is_refused_before_it_reads_it(tmp_path, quant):
    ft, inf = make_arch_gguf_pair(tmp_path / "in", "llama", meta={"llama.block_count": 2**31})
    out = tmp_path / "out"
    _refused(*_convert(ft, inf, out, "--quant", quant), out, "finetuned.gguf", "llama.block_count", "2147483648")


def test_block_count_must_match_the_layers(tmp_path):
    ft, inf = make_arch_gguf_pair(tmp_path / "in", "llama", meta={"llama.block_count": 3})
    out = tmp_path / "out"
    _refused(*_convert(ft, inf, out), out, "llama.block_count is 3 but the weights have 2 layers")
    ft, inf = make_arch_gguf_pair(tmp_path / "in2", "llama", meta={"llama.block_count": 600})
    _refused(*_convert(ft, inf, out), out, "llama.block_count is 600, more than llama.cpp's limit of 512")


def test_an_abort_in_the_model_check_is_one_line_in_this_process(tmp_path):
    """The model check loads the file in a child process: llama.cpp's GGML_ASSERT kills the child, not us."""
    from epicode_edge.runtime import check_gguf_runs

    ft, _ = make_arch_gguf_pair(tmp_path / "in", "llama", meta={"llama.block_count": 2**31})
    with pytest.raises(BackendError) as e:
        check_gguf_runs(ft)
    line = str(e.value)
    assert "\n" not in line
    assert f"llama.cpp could not load {ft}: the process died with signal 6 (SIGABRT)" in line
    assert "GGML_ASSERT" in line and "LLAMA_MAX_LAYERS" in line


def test_context_length_beyond_32_bits_is_one_line(tmp_path):
    ft, inf = make_arch_gguf_pair(tmp_path / "in", "llama", meta={"llama.context_length": 2**32 - 1})
    out = tmp_path / "out"
    _refused(*_convert(ft, inf, out), out, "finetuned.gguf", "llama.context_length is 4294967295")


def _nested_arrays_gguf(path: Path, depth: int) -> Path:
    """A GGUF file (no tensors) whose one metadata value is an array of arrays `depth` deep."""
    key = b"evil.nested"
    body = struct.pack("<Q", len(key)) + key + struct.pack("<I", 9)  # key, type ARRAY
    body += struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 0, 0)  # ARRAY of ... of 0 uint8
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body)
    return path


def test_metadata_arrays_nested_100k_deep_are_one_line(tmp_path):
    bad = _nested_arrays_gguf(tmp_path / "nested.gguf", 100_000)
    out = tmp_path / "out"
    _refused(*_convert(bad, bad, out), out, "nested.gguf", "metadata arrays nested more than 16 deep")


def _set_dims(path: Path, tensor: str, dims: tuple[int, ...]) -> None:
    """Rewrite one tensor's dims in the header (same count of dims: the header keeps its length)."""
    data = bytearray(path.read_bytes())
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    assert n_dims == len(dims)
    struct.pack_into(f"<{n_dims}Q", data, at + 4, *dims)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("dims,expect", [
    ((2**32, 2**32), "more elements than int64 counts"),  # product 2^64: overflows int64
    ((2**63, 2), "more elements than int64 counts"),  # one dim beyond int64
    ((2**32, 2**31), "more elements than int64 counts"),  # 2^63: wraps negative in int64
    ((2**31, 2**31), "truncated"),  # 2^62 values: fits int64, not the file
])
def test_tensor_dims_that_overflow_are_one_line(tmp_path, dims, expect):
    ft, inf = make_arch_gguf_pair(tmp_path / "in", "llama")
    for f in (ft, inf):
        _set_dims(f, "blk.0.ffn_down.weight", dims)
    out = tmp_path / "out"
    _refused(*_convert(ft, inf, out), out, "finetuned.gguf", "'blk.0.ffn_down.weight'", expect)


def test_a_gguf_chat_template_with_a_syntax_error_is_refused(tmp_path):
    broken = "{% for m in messages %}{{ m.content }"
    ft, inf = make_arch_gguf_pair(tmp_path / "in", "llama", meta={"tokenizer.chat_template": broken})
    out = tmp_path / "out"
    _refused(*_convert(ft, inf, out), out, "finetuned.gguf", "tokenizer.chat_template", "Jinja syntax error")


def _convert_process(ft, inf, out, *extra):
    """convert in a child process, bounded in time (a FIFO would block an in-process run forever)."""
    root = str(Path(__file__).parent.parent)  # this checkout's epicode_edge
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "epicode_edge.cli", "convert", "--finetuned", str(ft), "--inferior",
                        str(inf), "--mu", "0.5", "-o", str(out), *map(str, extra)], capture_output=True, text=True,
                       timeout=60, env=env)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("which", ["finetuned", "inferior"])
def test_a_fifo_input_is_refused_unopened(tmp_path, which):
    ft, inf = make_arch_gguf_pair(tmp_path / "in", "llama")
    fifo = tmp_path / "in" / "pipe.gguf"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    args = (fifo, inf) if which == "finetuned" else (ft, fifo)
    _refused(*_convert_process(*args, out), out, "pipe.gguf: a FIFO (named pipe), not a model file or folder")


def test_a_fifo_base_of_lora_adapters_is_refused_unopened(tmp_path):
    from factory import make_hf_model, make_lora_pair

    base = make_hf_model(tmp_path / "base")
    ft, inf = make_lora_pair(tmp_path / "adapters", base)
    fifo = tmp_path / "base.gguf"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    _refused(*_convert_process(ft, inf, out, "--base", fifo), out, "base.gguf: a FIFO (named pipe)")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_a_device_input_is_refused_unopened(tmp_path):
    ft, _ = make_arch_gguf_pair(tmp_path / "in", "llama")
    out = tmp_path / "out"
    _refused(*_convert_process(ft, "/dev/zero", out), out, "/dev/zero: a character device, not a model file")


def test_a_fifo_inside_an_hf_folder_is_refused_unopened(tmp_path):
    import threading

    from epicode_edge.converters.safetensors_io import SafetensorsFile

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    got = []

    def open_it():
        try:
            SafetensorsFile(fifo)
        except CheckpointError as e:
            got.append(str(e))

    t = threading.Thread(target=open_it, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # blocked in open(): a writer end releases it, then the test fails
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
        pytest.fail("opening a FIFO blocked")
    assert got == [f"{fifo}: a FIFO (named pipe), not a model file"]
