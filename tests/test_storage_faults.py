"""Storage fault drill: the S3 server (a real ``weed mini``) is killed in the middle of an upload and of a
``localize`` and restarted ~5 s later on the same ports and data dir; both finish, every object present and
verified, and nothing that had completed is transferred twice."""

from __future__ import annotations

import collections
import os
import subprocess
import threading

from idforge.config import StorageConfig
from idforge.io.storage import S3Storage, localize
from tests.fixtures.process import stop_group, wait_ready
from tests.fixtures.s3 import start_s3_server

N_FILES = 12
OUTAGE_S = 5.0


def test_s3_outage_mid_upload_and_mid_localize_is_ridden_out(tmp_path, monkeypatch):
    server, proc = start_s3_server(tmp_path / "srv")
    procs = [proc]
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)

    def outage() -> None:
        """Kill the server now; restart the same command (same ports, same data dir) after OUTAGE_S."""
        stop_group(procs[-1], grace_s=0)

        def restart() -> None:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
            env.update(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key)
            with open(server.log_path.with_suffix(".restart.log"), "wb") as fh:
                procs.append(subprocess.Popen(procs[0].args, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                              cwd=tmp_path / "srv", start_new_session=True))

        threading.Timer(OUTAGE_S, restart).start()

    calls: collections.Counter[str] = collections.Counter()
    done: collections.Counter[str] = collections.Counter()

    def counting(name):  # type: ignore[no-untyped-def]
        real = getattr(S3Storage, name)

        def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls[name] += 1
            if calls[name] == N_FILES // 2:
                outage()
            out = real(self, *args, **kwargs)
            done[f"{name}:{args[-1] if name == 'put_file' else args[0]}"] += 1
            return out

        return wrapper

    try:
        src = tmp_path / "dataset"
        src.mkdir()
        for i in range(N_FILES):
            (src / f"f{i:02d}.bin").write_bytes(os.urandom(4096 + i))
        storage = S3Storage(StorageConfig(retry_total_s=60, retry_base_s=0.2, retry_max_wait_s=1))
        prefix = f"s3://{server.bucket}/drill/ds"
        monkeypatch.setattr(S3Storage, "put_file", counting("put_file"))
        result = storage.upload_dir(src, prefix)
        assert sorted(result.copied) == sorted(p.name for p in src.iterdir())
        assert all(n == 1 for n in done.values()) and len(done) == N_FILES  # each object uploaded exactly once
        listed = {i.uri.rsplit("/", 1)[1]: i for i in storage.list_info(prefix)}
        assert {k: v.size for k, v in listed.items()} == {p.name: p.stat().st_size for p in src.iterdir()}

        wait_ready(procs[-1], lambda: storage.list_info(prefix) is not None, what="weed mini",
                   log_path=server.log_path, timeout_s=60, interval_s=0.2)
        calls.clear()
        done.clear()
        monkeypatch.setattr(S3Storage, "_get_once", counting("_get_once"))
        local = localize(prefix, tmp_path / "cache")
        assert len(done) == N_FILES and all(n == 1 for n in done.values()), done  # nothing downloaded twice
        for p in src.iterdir():
            assert (local / p.name).read_bytes() == p.read_bytes()
        assert not list((tmp_path / "cache").glob("*.partial"))
        assert len(procs) == 3  # two real outages happened
    finally:
        for p in procs:
            stop_group(p, grace_s=2)
