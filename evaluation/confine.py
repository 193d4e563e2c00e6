"""What bounds a sandboxed program beyond bwrap's namespaces (evaluation/code_exec.py): its process tree's memory as a
whole, and a seccomp filter that hides the kernel keyrings.

    python -m evaluation.code_exec check      # says which memory bound applies on this node

Memory. An address-space rlimit is per process, so eight children of 800 MiB each took 4.7 GB of a node. Where this
node lets the evaluator make a memory cgroup (root, with cgroup v2's or v1's memory controller writable), each program
runs in a cgroup of its own whose limit is the whole tree's, tmpfs pages (/tmp, /work, /dev/shm) included; the kernel
OOM-kills inside it and nowhere else. Elsewhere the process count is lowered to FALLBACK_PROCESSES and the per-process
address space scaled so that their product stays under the same cap.

Keyrings. A new user namespace still reaches the session and user keyrings of its uid (keyctl); bwrap has no switch
for it, so the sandbox gets a seccomp filter (classic BPF, built here: libseccomp is not a dependency) that answers
keyctl, add_key and request_key with EPERM.
"""

from __future__ import annotations

import contextlib
import os
import platform
import struct
from collections.abc import Iterator
from pathlib import Path

FALLBACK_PROCESSES = 8
"""Processes (and threads) a program may have where no cgroup bounds its tree; each gets memory / this much."""
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_cgroup() -> tuple[Path, str] | None:
    """(folder where a child memory cgroup can be made, its limit file), or None where this process cannot."""
    if os.geteuid() != 0:
        return None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (CGROUP_ROOT / "cgroup.controllers").is_file():  # v2, unified
            folder = CGROUP_ROOT / path.lstrip("/")
            with contextlib.suppress(OSError):
                if "memory" in (folder / "cgroup.subtree_control").read_text(errors="replace").split():
                    return folder, "memory.max"
        if "memory" in controllers.split(","):  # v1
            folder = CGROUP_ROOT / "memory" / path.lstrip("/")
            if (folder / "memory.limit_in_bytes").is_file():
                return folder, "memory.limit_in_bytes"
    return None


def memory_cgroups() -> bool:
    """Whether programs here run in a memory cgroup of their own (checked by making and removing one)."""
    with program_cgroup(64 << 20) as procs:
        return procs is not None


@contextlib.contextmanager
def program_cgroup(limit_bytes: int) -> Iterator[Path | None]:
    """A new memory cgroup capped at `limit_bytes` (swap included where the kernel counts it), yielding its
    `cgroup.procs` file to join; None where none can be made. Removed when the block ends (its processes are gone)."""
    found = _own_cgroup()
    if found is None:
        yield None
        return
    parent, limit_file = found
    folder = parent / f"raygpt-sandbox-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        folder.mkdir()
        (folder / limit_file).write_text(str(limit_bytes))
    except OSError:  # a read-only or delegated-elsewhere hierarchy: no cgroup, the shared-rlimit bound applies
        with contextlib.suppress(OSError):
            folder.rmdir()
        yield None
        return
    try:
        for swap in ("memory.swap.max", "memory.memsw.limit_in_bytes"):  # no way around the cap through swap
            with contextlib.suppress(OSError):
                (folder / swap).write_text("0" if swap == "memory.swap.max" else str(limit_bytes))
        yield folder / "cgroup.procs"
    finally:
        with contextlib.suppress(OSError):
            folder.rmdir()


def enter_and_drop(procs: str | None, uid: int | None) -> str:
    """Python source that moves its own process into a cgroup (`procs`, when given), drops to `uid` (when given),
    then execs argv[1:]: the first step of a sandbox's command line, so that everything the sandbox starts is inside
    the cgroup from its first instruction (joining after the start would race its first fork)."""
    return (
        "import os, sys\n"
        + (f"open({procs!r}, 'w').write(str(os.getpid()))\n" if procs else "")
        + (f"os.setgroups([]); os.setgid({uid}); os.setuid({uid})\n" if uid is not None else "")
        + "os.execv(sys.argv[1], sys.argv[1:])\n"
    )


# -- seccomp: EPERM for the keyring syscalls -------------------------------------------------------------------------
_ARCH = {  # machine → (AUDIT_ARCH_*, syscall numbers of keyctl, add_key, request_key)
    "x86_64": (0xC000003E, (250, 248, 249)),
    "aarch64": (0xC00000B7, (219, 217, 218)),
}
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
_ALLOW, _ERRNO_EPERM, _KILL = 0x7FFF0000, 0x00050001, 0x80000000  # SECCOMP_RET_ERRNO | EPERM; KILL_PROCESS


def keyring_filter() -> bytes | None:
    """A seccomp program (struct sock_filter[]) that returns EPERM for keyctl, add_key and request_key and allows
    everything else; a call from another ABI than the node's (x32, i386) is killed. None on an unknown machine."""
    arch = _ARCH.get(platform.machine())
    if arch is None:
        return None
    audit_arch, numbers = arch

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    program = [op(_LD_W_ABS, 4), op(_JEQ_K, audit_arch, 1, 0), op(_RET_K, _KILL), op(_LD_W_ABS, 0)]
    if audit_arch == 0xC000003E:  # x32 calls set bit 30 of the number on x86_64: refuse them outright
        program += [op(0x45, 0x40000000, 0, 1), op(_RET_K, _KILL)]  # JSET
    for i, number in enumerate(numbers):
        program.append(op(_JEQ_K, number, len(numbers) - i, 0))  # to the EPERM return after the ALLOW
    return b"".join([*program, op(_RET_K, _ALLOW), op(_RET_K, _ERRNO_EPERM)])
