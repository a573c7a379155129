"""Adversarial suite: hostile programs must be contained, with the right status, leaving nothing behind."""
import os
import socket
import time
from pathlib import Path

import pytest

from r1kit import sandbox


def _sandbox_processes(uid):
    """Host processes still running as the run's private uid (must be none after a run)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Uid:") and int(line.split()[1]) == uid:
                found.append(int(d.name))
    return found


def _run(code, **kw):
    kw.setdefault("timeout_s", 3)
    r = sandbox.run(code, **kw)
    if r.uid is not None:
        time.sleep(0.05)
        assert _sandbox_processes(r.uid) == [], f"processes left behind by {r.uid}"
    return r


def test_strongest_isolation_is_used_here():
    iso = sandbox.available_isolation()
    r = _run("print('hi')")
    assert r.status == "ok" and r.stdout == "hi\n" and r.duration_s > 0
    if iso == "namespaces":  # this machine: root with unshare; say so in the result
        assert r.isolation.startswith("namespaces(pid,net,mount")


def test_error_and_stdin():
    r = _run("import sys; print(sys.stdin.read().upper()); raise SystemExit(3)", stdin="abc")
    assert r.status == "error" and r.returncode == 3 and r.stdout == "ABC\n"


def test_infinite_loop_hits_cpu_or_wall_limit():
    r = _run("while True: pass", timeout_s=1.5)
    assert r.status == "timeout" and r.duration_s < 4


def test_sleep_past_wall_limit():
    r = _run("import time; time.sleep(60)", timeout_s=1)
    assert r.status == "timeout" and r.duration_s < 3


def test_memory_bomb():
    r = _run("x = bytearray(8 * 1024**3)", memory_mb=256)
    assert r.status == "memory"
    r = _run("x = []\nwhile True: x.append(' ' * 10**6)", memory_mb=256)
    assert r.status == "memory"


def test_fork_bomb_is_capped_and_cleaned():
    # tiny cap and a strict timeout: if containment failed this still cannot hang the machine
    code = ("import os\nn = 0\nwhile n < 200:\n    try:\n        if os.fork() == 0:\n"
            "            import time; time.sleep(30); os._exit(0)\n        n += 1\n"
            "    except OSError:\n        break\nprint(n)")
    r = _run(code, timeout_s=4, max_processes=5)
    assert r.status == "ok" and int(r.stdout) < 5


def test_real_fork_bomb_contained():
    r = _run("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass", timeout_s=1.5, max_processes=6)
    assert r.status == "timeout"


def test_huge_output_is_capped():
    r = _run("while True: print('x' * 1000)", max_output_bytes=10_000)
    assert r.status == "output_limit" and len(r.stdout) <= 10_000 and r.truncated


def test_writing_outside_its_folder_fails(tmp_path):
    target = tmp_path / "escape.txt"
    os.chmod(tmp_path, 0o777)  # even a world-writable host folder is out of reach
    paths = [str(target), "/tmp/r1kit_escape.txt", "/work/r1kit_escape.txt", "/etc/r1kit_escape", "/var/tmp/r1kit_escape"]
    code = f"paths = {paths!r}\nok = 0\nfor p in paths:\n    try:\n        open(p, 'w').write('x'); ok += 1\n    except OSError:\n        pass\n" \
           "open('inside.txt', 'w').write('fine')\nprint(ok)"
    r = _run(code)
    assert r.status == "ok"
    for p in paths:
        assert not os.path.exists(p), p
    if r.isolation.startswith("namespaces"):
        assert r.stdout.strip() in ("0", "1")  # /tmp inside is the run's own tmpfs


def test_filling_the_disk_is_capped():
    code = "i = 0\ntry:\n    while True:\n        open(f'f{i}', 'wb').write(b'0' * 4_000_000); i += 1\nexcept OSError as e:\n    print('stopped', i)"
    r = _run(code, timeout_s=5, max_file_mb=8, disk_mb=32)
    assert r.status in ("ok", "error") and (r.stdout.startswith("stopped") or r.status == "error")
    r = _run("open('big', 'wb').write(b'0' * 50_000_000)", max_file_mb=4)
    assert r.status == "error"


def test_host_environment_and_home_are_hidden(monkeypatch):
    monkeypatch.setenv("R1KIT_SECRET_TOKEN", "hunter2")
    code = ("import os\nprint(sorted(os.environ))\nprint('hunter2' in open('/proc/self/environ').read())\n"
            "try:\n    print(os.listdir(os.path.expanduser('/root')))\nexcept OSError:\n    print('denied')\n"
            "try:\n    print(open('/proc/1/environ').read().count('hunter2'))\nexcept OSError:\n    print('denied')")
    r = _run(code)
    assert r.status == "ok" and "hunter2" not in r.stdout and "R1KIT_SECRET_TOKEN" not in r.stdout
    assert ".bashrc" not in r.stdout


def test_socket_cannot_reach_the_host():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    code = f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\nprint('connected')"
    r = _run(code)
    server.close()
    assert r.status == "error" and "connected" not in r.stdout


def test_killing_its_parent_does_not_reach_the_host():
    r = _run("import os, signal\nfor p in (os.getppid(), 0, -1, 1):\n    try: os.kill(p, signal.SIGKILL)\n    except OSError: pass\nprint('alive')")
    assert r.status in ("ok", "killed", "error")
    assert os.getppid() > 1  # the test process itself survived


def test_deep_recursion():
    r = _run("def f(n): return f(n + 1)\nf(0)")
    assert r.status == "error" and "RecursionError" in r.stderr
    # no recursion limit: 3.11 frames live on the heap, so memory or time runs out first
    r = _run("import sys\nsys.setrecursionlimit(10**7)\ndef f(n): return f(n + 1)\nf(0)", memory_mb=128, timeout_s=2)
    assert r.status in ("killed", "error", "memory", "timeout") and r.duration_s < 4


def test_detached_child_does_not_outlive_the_run():
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n"
            "    os._exit(0)\nprint('parent done')")
    r = _run(code)
    assert r.status == "ok" and r.duration_s < 2  # the grandchild was killed with the run


def test_detached_child_killed_on_timeout():
    r = _run("import os, time\nos.setsid()\nif os.fork() == 0:\n    os.setsid(); time.sleep(60)\ntime.sleep(60)", timeout_s=1)
    assert r.status == "timeout"


def test_many_threads_and_open_files_capped():
    r = _run("import threading, time\nts = [threading.Thread(target=time.sleep, args=(0.5,)) for _ in range(100)]\n"
             "[t.start() for t in ts]", max_processes=8)
    assert r.status == "error"
    r = _run("fs = [open(f'f{i}', 'w') for i in range(1000)]")
    assert r.status == "error" and "Too many open files" in r.stderr


def test_working_folder_is_fresh_and_removed():
    r1 = _run("import os\nprint(os.listdir('.'))\nopen('leftover', 'w').write('x')")
    r2 = _run("import os\nprint(os.listdir('.'))")
    assert r1.stdout == r2.stdout == "['main.py']\n"


def test_privilege_escalation_fails():
    r = _run("import os\nos.setuid(0)")
    assert r.status == "error" and "PermissionError" in r.stderr


def test_batch_in_order():
    results = sandbox.run_batch([f"print({i})" for i in range(8)], timeout_s=5)
    assert [r.stdout.strip() for r in results] == [str(i) for i in range(8)]


def test_basic_mode_still_contains_loops_and_network():
    r = sandbox.run("while True: pass", timeout_s=1, isolation="basic")
    assert r.status == "timeout" and r.isolation.startswith("basic")
    r = sandbox.run("import socket\nsocket.create_connection(('127.0.0.1', 9))", timeout_s=3, isolation="basic")
    assert r.status == "error" and "disabled" in r.stderr


def test_bad_arguments():
    with pytest.raises(TypeError):
        sandbox.run(b"print(1)")
    with pytest.raises(ValueError, match="isolation"):
        sandbox.run("print(1)", isolation="docker")
