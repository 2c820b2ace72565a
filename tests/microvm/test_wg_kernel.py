"""Kernel WireGuard backend, tested for real inside a virtme-ng microVM.

This host has no wireguard.ko, so one session-scoped fixture boots the Debian kernel (which has it) once
with `vng --disable-kvm` (TCG, ~30-90 s) and runs tests/netns/test_wg_userspace.py inside the VM with
MESHD_WG_TEST_BACKEND=kernel: the same namespace/veth/ping/`wg show`/reconcile tests, now on kernel
links created through pyroute2 netlink. Each host-side test below checks one in-VM test's result in the
JUnit report the VM wrote into a --rwdir temp directory. When the VM cannot boot here (no qemu, no
kernel image, no wireguard.ko for it, no vng), every test is skipped with the exact reason.
"""

from __future__ import annotations

import ast
import os
import shutil
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IN_VM_MODULE = "tests/netns/test_wg_userspace.py"


def _default_kernel() -> Path:
    """The newest /boot/vmlinuz-* whose modules include wireguard.ko (Debian's linux-image-amd64 moves on)."""
    for image in sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        if any((Path("/lib/modules") / image.name.removeprefix("vmlinuz-")).rglob("wireguard.ko*")):
            return image
    return Path("/boot/vmlinuz-6.1.0-56-amd64")  # named in the skip message when nothing fits


KERNEL = Path(os.environ.get("MESHD_TEST_KERNEL") or _default_kernel())
KERNEL_ONLY_SKIPS = {  # in-VM tests that exercise wireguard-go only and skip by design under the kernel
    "test_same_name_in_another_namespace_is_refused_with_a_clear_error",
    "test_wireguard_go_is_restarted_and_reconfigured_when_it_dies",
    "test_a_link_of_that_name_that_exists_already_is_refused_and_left_alone",
}

pytestmark = [pytest.mark.microvm, pytest.mark.slow, pytest.mark.timeout(900)]


def _in_vm_tests() -> list[str]:
    tree = ast.parse((ROOT / IN_VM_MODULE).read_text())
    # top-level tests, and those defined under a top-level `if BACKEND == "kernel":` (kernel-only ones)
    nodes = list(tree.body) + [n for b in tree.body if isinstance(b, ast.If) for n in b.body]
    return [n.name for n in nodes if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


@dataclass(frozen=True)
class VmRun:
    returncode: int
    output: str
    results: dict[str, str]  #: in-VM test name -> "passed" | "failed" | "skipped"


def _why_not_bootable() -> str | None:
    venv_bin = Path(sys.executable).parent
    release = KERNEL.name.removeprefix("vmlinuz-")
    if not KERNEL.is_file():
        return f"no kernel image {KERNEL} (apt-get install linux-image-amd64, or set MESHD_TEST_KERNEL)"
    modules = Path("/lib/modules") / release
    if not any(modules.rglob("wireguard.ko*")):
        return f"no wireguard.ko under {modules} for the VM kernel"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
    if not (venv_bin / "vng").exists() and shutil.which("vng") is None:
        return "virtme-ng (vng) not installed in the venv (pip install virtme-ng)"
    if os.geteuid() != 0:
        return "needs root"
    return None


@pytest.fixture(scope="session")
def kernel_vm(tmp_path_factory: pytest.TempPathFactory) -> VmRun:
    reason = _why_not_bootable()
    if reason:
        pytest.skip(f"microVM cannot boot on this machine: {reason}")
    out = tmp_path_factory.mktemp("microvm")
    junit = out / "junit.xml"
    inner = (
        f"cd {ROOT} && modprobe wireguard && "
        f"MESHD_WG_TEST_BACKEND=kernel PYTHONDONTWRITEBYTECODE=1 {sys.executable} -m pytest "
        f"-p no:cacheprovider -q -rA {IN_VM_MODULE} --junitxml={junit}"
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    cmd = ["vng", "--run", str(KERNEL), "--disable-kvm", "--user", "root", "--memory", "1G",
           "--rwdir", str(out), "--exec", inner]  # fmt: skip
    # own session, so that a timeout (or Ctrl-C) takes down vng, virtme-run and qemu together
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=780)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"microVM run did not finish in 780 s; output:\n{output[-6000:]}")
    results: dict[str, str] = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = case.get("name", "")
            if case.find("failure") is not None or case.find("error") is not None:
                results[name] = "failed"
            elif case.find("skipped") is not None:
                results[name] = "skipped"
            else:
                results[name] = "passed"
    return VmRun(proc.returncode, output, results)


@pytest.mark.parametrize("name", _in_vm_tests())
def test_kernel_backend_in_microvm(kernel_vm: VmRun, name: str) -> None:
    """One in-VM test (the netns test module run against the kernel backend)."""
    tail = kernel_vm.output[-8000:]
    assert kernel_vm.results, f"the VM produced no test report (exit {kernel_vm.returncode}):\n{tail}"
    got = kernel_vm.results.get(name)
    expected = "skipped" if name in KERNEL_ONLY_SKIPS else "passed"
    assert got == expected, f"{name}: {got} in the VM (expected {expected}); VM output:\n{tail}"


def test_microvm_run_succeeded(kernel_vm: VmRun) -> None:
    assert kernel_vm.returncode == 0, f"VM run exited {kernel_vm.returncode}:\n{kernel_vm.output[-8000:]}"
