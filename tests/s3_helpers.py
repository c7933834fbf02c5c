"""A real S3-compatible server on loopback for the object-storage tests: moto's standalone
server (``moto[server]``) in its own process, reached by s3fs/botocore through the standard
environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), as a user's cloud
credentials would be."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BUCKET = "tec-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment a process needs to use the loopback server (inherited by children)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


def start_moto(log: Path, **env) -> tuple[subprocess.Popen, str]:
    """moto_server on a free loopback port (env: e.g. INITIAL_NO_AUTH_ACTION_COUNT=0 turns
    its credential checks on); returns (process, endpoint URL) once it accepts connections."""
    port = _free_port()
    server = Path(sys.executable).with_name("moto_server")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(  # noqa: B904 (the last connection error stays the context)
                    f"moto_server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """Start moto_server on a free loopback port; yield its endpoint URL with the environment
    set for this process (and its children), one bucket BUCKET created; stop it at the end."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    proc, endpoint = start_moto(tmp_path_factory.mktemp("moto") / "server.log")
    saved = {k: os.environ.get(k) for k in s3_env(endpoint)}
    os.environ.update(s3_env(endpoint))
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    _reset_fs()
    try:
        yield endpoint
    finally:
        stop(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _reset_fs()


def _reset_fs() -> None:
    """Forget filesystems made with another environment."""
    from storage import objstore

    objstore._fs_cache.clear()


def upload_tree(local: Path, url: str) -> list[str]:
    """Copy every file under `local` to `url` (same relative paths); returns the object URLs."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    out = []
    for p in sorted(local.rglob("*")):
        if p.is_file():
            key = f"{url.rstrip('/')}/{p.relative_to(local).as_posix()}"
            fs.put_file(str(p), key)
            out.append(key)
    return out
