"""meshd's marked block in a hosts file: the text transform and the in-place file edit."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.hosts import HostEntry, HostsError, HostsFile, remove, render

SYSTEM = "127.0.0.1\tlocalhost\n::1 localhost ip6-localhost\n\n# keep me\n10.0.0.5 nas\n"
B = HostEntry("100.64.0.2", "b")
C = HostEntry("100.64.0.3", "c")

BLOCK_BC = (
    "# BEGIN meshd mesh0 (managed by meshd; edits inside are overwritten)\n"
    "100.64.0.2 b.mesh b\n"
    "100.64.0.3 c.mesh c\n"
    "# END meshd mesh0\n"
)


def test_block_is_appended_with_one_line_per_peer() -> None:
    assert render(SYSTEM, "mesh0", [C, B]) == SYSTEM + BLOCK_BC


def test_update_replaces_only_our_block_in_place() -> None:
    text = render(SYSTEM, "mesh0", [B]) + "192.168.1.1 router\n"
    new = render(text, "mesh0", [B, C])
    assert new == SYSTEM + BLOCK_BC + "192.168.1.1 router\n"


def test_removal_restores_the_file() -> None:
    assert remove(render(SYSTEM, "mesh0", [B, C]), "mesh0") == SYSTEM


def test_other_tags_are_left_alone() -> None:
    two = render(render(SYSTEM, "mesh0", [B]), "mesh1", [C], domain="lab")
    assert "100.64.0.3 c.lab c\n# END meshd mesh1\n" in two
    assert remove(two, "mesh1") == render(SYSTEM, "mesh0", [B])
    assert remove(two, "mesh0") == render(SYSTEM, "mesh1", [C], domain="lab")


def test_half_block_from_a_crash_is_repaired() -> None:
    cut = SYSTEM + BLOCK_BC[: BLOCK_BC.index("# END")]  # END never written
    cut += "8.8.8.8 dns\n"
    fixed = render(cut, "mesh0", [B])
    assert fixed.count("# BEGIN meshd mesh0") == 1
    assert fixed.count("# END meshd mesh0") == 1
    assert "c.mesh" not in fixed
    assert "8.8.8.8 dns\n" in fixed
    assert remove(fixed, "mesh0") == SYSTEM + "8.8.8.8 dns\n"


def test_duplicate_blocks_and_orphan_end_are_cleaned() -> None:
    text = BLOCK_BC + SYSTEM + BLOCK_BC + "# END meshd mesh0\n"
    assert render(text, "mesh0", [B]) == render("", "mesh0", [B]) + SYSTEM


def test_missing_final_newline_gets_one_before_the_block() -> None:
    assert render("127.0.0.1 localhost", "mesh0", []) == (
        "127.0.0.1 localhost\n"
        "# BEGIN meshd mesh0 (managed by meshd; edits inside are overwritten)\n"
        "# END meshd mesh0\n"
    )


def test_entry_for_peer_prefers_ipv4_and_drops_prefix() -> None:
    assert HostEntry.for_peer("b", ["fd7a:115c:a1e0::2/128", "100.64.0.2/32"]) == B


@pytest.mark.parametrize(
    ("ip", "name"), [("100.64.0.300", "b"), ("x", "b"), ("100.64.0.2", "B c"), ("100.64.0.2", "-b")]
)
def test_bad_entries_are_refused(ip: str, name: str) -> None:
    with pytest.raises(HostsError):
        HostEntry(ip, name)


def test_bad_tag_is_refused() -> None:
    with pytest.raises(HostsError, match="tag"):
        render("", "mesh 0", [])


lines = st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=40)
entries = st.lists(
    st.builds(
        HostEntry,
        st.ip_addresses().map(str),
        st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z"),
    ),
    max_size=5,
)


@settings(max_examples=200)
@given(st.lists(lines, max_size=12), st.booleans(), entries)
def test_other_lines_always_preserved(body: list[str], final_nl: bool, ents: list[HostEntry]) -> None:
    text = "\n".join(body) + ("\n" if final_nl and body else "")
    if "meshd mesh0" in text:
        return  # lines that are our markers are ours
    new = render(text, "mesh0", ents)
    assert render(new, "mesh0", ents) == new  # idempotent
    back = remove(new, "mesh0")
    assert back == text or back == text + "\n"
    assert back.split("\n")[: len(body)] == body


@settings(max_examples=200)
@given(st.lists(st.one_of(lines, st.sampled_from(BLOCK_BC.splitlines())), max_size=15), entries)
def test_any_text_ends_with_exactly_one_block(body: list[str], ents: list[HostEntry]) -> None:
    new = render("\n".join(body), "mesh0", ents)
    assert new.count("# BEGIN meshd mesh0 ") == 1
    assert new.count("\n# END meshd mesh0\n") + new.startswith("# END meshd mesh0\n") == 1
    assert render(new, "mesh0", ents) == new


# --- the file ------------------------------------------------------------------------------------------


def test_file_is_edited_in_place_and_only_when_needed(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_bytes(SYSTEM.encode() + b"10.1.1.1 caf\xe9\n")  # not UTF-8: kept byte for byte
    alias = tmp_path / "alias"
    os.link(hosts, alias)  # a second name for the same inode sees in-place edits only
    inode = hosts.stat().st_ino
    hf = HostsFile(hosts, tag="mesh0")

    assert hf.update([B, C]) is True
    assert hosts.stat().st_ino == inode
    assert alias.read_bytes() == SYSTEM.encode() + b"10.1.1.1 caf\xe9\n" + BLOCK_BC.encode()
    assert hf.update([C, B]) is False

    assert hf.update([B]) is True  # shrinking truncates
    assert b"c.mesh" not in alias.read_bytes()
    assert hf.remove() is True
    assert alias.read_bytes() == SYSTEM.encode() + b"10.1.1.1 caf\xe9\n"
    assert hf.remove() is False


def test_missing_file_is_created_on_update_and_left_missing_on_remove(tmp_path: Path) -> None:
    assert HostsFile(tmp_path / "none").remove() is False
    assert not (tmp_path / "none").exists()
    assert HostsFile(tmp_path / "new").update([B]) is True
    assert (tmp_path / "new").read_text().startswith("# BEGIN meshd mesh0")


def test_unwritable_path_is_a_hosts_error(tmp_path: Path) -> None:
    with pytest.raises(HostsError, match="cannot"):
        HostsFile(tmp_path / "no" / "such" / "dir").update([B])
    with pytest.raises(HostsError, match="cannot open"):
        HostsFile(tmp_path).update([B])  # a directory


def test_two_daemons_sharing_a_file_keep_both_blocks(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(SYSTEM)
    errors: list[BaseException] = []

    def churn(tag: str, entry: HostEntry) -> None:
        try:
            hf = HostsFile(hosts, tag=tag)
            for i in range(100):
                hf.update([entry] if i % 2 else [entry, HostEntry("100.64.9.9", f"x{tag}")])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(t, e)) for t, e in (("wg-a", B), ("wg-b", C))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    text = hosts.read_text()
    assert text.startswith(SYSTEM)
    assert "# BEGIN meshd wg-a" in text and "# BEGIN meshd wg-b" in text
    assert "100.64.0.2 b.mesh b" in text and "100.64.0.3 c.mesh c" in text
    assert remove(remove(text, "wg-a"), "wg-b") == SYSTEM


def test_bind_mounted_hosts_file_is_updated_through_the_mount(tmp_path: Path) -> None:
    """As in containers: /etc/hosts is a bind mount, which rename-over cannot replace (EBUSY)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private mount namespace")
    real = tmp_path / "real"
    real.write_text(SYSTEM)
    target = tmp_path / "target"
    target.write_text("")
    code = (
        "import sys; from pathlib import Path; from meshd.hosts import HostEntry, HostsFile\n"
        "hf = HostsFile(Path(sys.argv[1]))\n"
        "print(hf.update([HostEntry('100.64.0.2', 'b'), HostEntry('100.64.0.3', 'c')]))\n"
        "try:\n"
        "    Path(sys.argv[1] + '.new').write_text('x'); Path(sys.argv[1] + '.new').rename(sys.argv[1])\n"
        "except OSError as e:\n"
        "    print(e.errno)\n"
    )
    script = 'mount --bind "$1" "$2" && exec "$3" -c "$4" "$2"'
    out = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            str(real),
            str(target),
            sys.executable,
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", str(errno.EBUSY)]  # ours worked; a rename would not have
    assert real.read_text() == SYSTEM + BLOCK_BC
    assert target.read_text() == ""  # outside the namespace nothing was mounted


def test_a_lock_held_elsewhere_is_waited_for_a_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11: the daemon edits the file in its event loop, also while stopping; a process that holds the
    lock for ever must cost at most LOCK_TIMEOUT, not the stop."""
    import fcntl
    import time

    import meshd.hosts

    monkeypatch.setattr(meshd.hosts, "LOCK_TIMEOUT", 0.3)
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 localhost\n")
    hf = HostsFile(path, tag="mesh0")
    with open(path, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: conflicts like another process would
        t0 = time.monotonic()
        with pytest.raises(HostsError, match="locked"):
            hf.update([HostEntry("100.64.0.2", "b")])
        assert 0.25 < time.monotonic() - t0 < 1.0
        released = threading.Timer(0.1, fcntl.flock, (holder, fcntl.LOCK_UN))
        released.start()
        assert hf.update([HostEntry("100.64.0.2", "b")]), "a lock released in time is waited for"
        released.join()
    assert "b.mesh" in path.read_text()


def test_a_name_the_file_already_has_or_a_reserved_one_is_written_only_with_the_domain() -> None:
    text = SYSTEM + "10.0.0.6 Printer printer.lan  # a comment names no host: nas2\n"
    entries = [
        HostEntry("100.64.0.2", "nas"),
        HostEntry("100.64.0.3", "printer"),
        HostEntry("100.64.0.4", "wpad"),
    ]
    out = render(text, "mesh0", [*entries, HostEntry("100.64.0.5", "nas2")])
    assert out == text + (
        "# BEGIN meshd mesh0 (managed by meshd; edits inside are overwritten)\n"
        "100.64.0.2 nas.mesh\n"
        "100.64.0.5 nas2.mesh nas2\n"
        "100.64.0.3 printer.mesh\n"
        "100.64.0.4 wpad.mesh\n"
        "# END meshd mesh0\n"
    )
    assert render(out, "mesh0", entries) == render(text, "mesh0", entries)  # our own lines shadow nothing
    assert remove(out, "mesh0") == text
    # a half block from a crash holding such a line is repaired too
    cut = out[: out.index("# END")] + "8.8.8.8 dns\n"
    assert remove(cut, "mesh0") == text + "8.8.8.8 dns\n"
