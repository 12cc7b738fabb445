"""Only regular files are opened: a FIFO where a JSON record or a safetensors file is expected is refused at once,
by name, instead of blocking the reader until some writer comes."""

import os
import subprocess
import time

import pytest

from mst_hf.io import files


def refused_at_once(read, fifo, seconds=10):
    """The error ``read()`` raises, checked to come within ``seconds``; a helper process opens ``fifo`` for writing
    after ``2 * seconds``, releasing a reader that blocked on it (which then fails the time check)."""
    writer = subprocess.Popen(["sh", "-c", f"sleep {2 * seconds}; exec 3> '{fifo}'"])
    start = time.monotonic()
    try:
        with pytest.raises(ValueError) as err:
            read()
    finally:
        writer.kill()
        writer.wait()
    assert time.monotonic() - start < seconds, f"blocked opening the FIFO {fifo}"
    return str(err.value)


@pytest.mark.parametrize("reader", ["read_json", "read_safetensors"])
def test_a_fifo_is_refused_by_name_without_blocking(reader, tmp_path):
    fifo = tmp_path / "mst_state.json"
    os.mkfifo(fifo)
    read = {"read_json": lambda: files.read_json(str(fifo)),
            "read_safetensors": lambda: files.read_safetensors(str(fifo), "MST mask file", "Save it again.")}[reader]
    message = refused_at_once(read, fifo)
    assert "mst_state.json" in message and "not a regular file" in message
