"""FastDeploy's documented launch lines for the splitwise scheduler, with ``fdcore engine``."""

from __future__ import annotations

import subprocess

from fdcore.testing import ServerProcess, free_port
from fdcore.testing.processes import python_module
from tests.engine.conftest import Engine
from tests.plugins.schedulers.global_.conftest import RedisServer
from tests.plugins.schedulers.splitwise.test_engines import complete, registered


def _line(role: str, redis_port: int, *, tp: str, protocols: str, rdma: bool) -> list[str]:
    port = free_port()
    flags = ["--model", "sim", "--port", str(port), "--metrics-port", str(free_port()),
             "--engine-worker-queue-port", str(free_port()),
             "--cache-queue-port", str(free_port()), "--tensor-parallel-size", tp,
             "--quantization", "wint4", "--cache-transfer-protocol", protocols,
             *(["--rdma-comm-ports", "7671,7672,7673,7674"] if rdma else []),
             "--pd-comm-port", str(free_port()), "--splitwise-role", role,
             "--scheduler-name", "splitwise", "--scheduler-host", "127.0.0.1",
             "--scheduler-port", str(redis_port), "--scheduler-ttl", "9000",
             "--host", "127.0.0.1"]
    return python_module("fdcore.engine", *flags)


def test_as_written_the_tensor_parallel_size_is_a_one_line_error(
    redis_server: RedisServer,
) -> None:
    done = subprocess.run(_line("prefill", redis_server.port, tp="4", protocols="rdma,ipc",
                                rdma=True), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "--tensor-parallel-size" in done.stderr and "only 1 is supported" in done.stderr
    assert "Traceback" not in done.stderr


def test_with_one_device_and_ipc_they_pair(redis_server: RedisServer) -> None:
    procs = []
    engines = []
    try:
        for role in ("prefill", "decode"):
            argv = _line(role, redis_server.port, tp="1", protocols="ipc", rdma=False)
            port = int(argv[argv.index("--port") + 1])
            proc = ServerProcess(argv, ready_url=f"http://127.0.0.1:{port}/health",
                                 ready_timeout=120)
            procs.append(proc.start())
            engines.append(Engine(proc, port))
        registered(redis_server, 2, topic="fd")  # FastDeploy's default topic
        status, body = complete(engines[0], "launched as FastDeploy documents it")
        assert status == 200, body
        assert "engine.flag_ignored" in procs[0].output()  # --quantization wint4: a warning
    finally:
        for proc in procs:
            proc.stop()
