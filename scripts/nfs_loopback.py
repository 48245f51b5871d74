"""A real NFS server and client on this machine, for the store's NFS tests and `ucm store bench`.

    python scripts/nfs_loopback.py install            # idempotent: Debian packages if missing
    python scripts/nfs_loopback.py up DIR [--mounts 2] # serve DIR/export at DIR/mnt0, DIR/mnt1 ... until Ctrl-C

Why user space on both ends: the machines this project is tested on boot a kernel without the
`nfs` and `nfsd` modules and cannot load modules (`mount -t nfs` fails with "No such device",
`rpc.nfsd` with "Unable to access /proc/fs/nfsd"). So the server is NFS-Ganesha (Debian's
`nfs-ganesha` + `nfs-ganesha-vfs`, exporting a local directory to 127.0.0.1 over NFSv3/TCP) and
each client is `nfs_fuse.py` (an NFSv3 client mounted through FUSE). The bytes the store writes
and reads cross a real NFS protocol path to a real server; each mount is a separate client with
its own caches, as two hosts would be.

One server at a time per machine (it takes the standard ports and registers with rpcbind), so
`up` holds an exclusive lock on /run/lock/ucm-nfs.lock (waiting for another user) until `down`.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
PACKAGES = ("nfs-ganesha", "nfs-ganesha-vfs", "rpcbind", "fuse3")
FSAL_VFS = Path("/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so")
NFS_PORT, MOUNT_PORT = 2049, 20048
LOCK_PATH = Path("/run/lock/ucm-nfs.lock")

_CONFIG = """
NFS_CORE_PARAM {{ Protocols = 3; NFS_Port = {nfs_port}; MNT_Port = {mount_port}; Bind_addr = 127.0.0.1;
                  Enable_NLM = false; Enable_RQUOTA = false; }}
NFSV4 {{ Graceless = true; RecoveryBackend = fs; RecoveryRoot = "{state}"; }}
EXPORT {{ Export_Id = 1; Path = "{export}"; Pseudo = /ucm; Access_Type = RW; Squash = No_Root_Squash;
          SecType = sys; Protocols = 3; Transports = TCP; FSAL {{ Name = VFS; }} }}
LOG {{ Default_Log_Level = EVENT; }}
"""


class NfsUnavailable(RuntimeError):
    """This machine cannot run the loopback NFS server or client; the message says what is missing."""


def missing() -> list[str]:
    """What `install` would add (empty when everything is in place)."""
    need = []
    if shutil.which("ganesha.nfsd") is None:
        need.append("nfs-ganesha")
    if not FSAL_VFS.exists():
        need.append("nfs-ganesha-vfs")
    if shutil.which("rpcbind") is None:
        need.append("rpcbind")
    if shutil.which("fusermount3") is None:
        need.append("fuse3")
    return need


def install() -> None:
    """Install the Debian packages if any is missing (refreshing the package lists only if the
    first attempt fails, so a machine that has them costs nothing)."""
    need = missing()
    if not need:
        return
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
    if missing():
        raise NfsUnavailable(f"after installing {', '.join(PACKAGES)} still missing: {', '.join(missing())}")


def _mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def _wait(what: str, ready: object, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():  # type: ignore[operator]
        if proc.poll() is not None:
            raise NfsUnavailable(f"{what} exited with {proc.returncode}; its log {log}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise NfsUnavailable(f"{what} not ready after {timeout_s:.0f} s; its log {log}:\n{_tail(log)}")
        time.sleep(0.05)


def _tail(log: Path) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    except OSError:
        return "(no log)"


def _port_open(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class LoopbackNfs:
    """A Ganesha server exporting `root/export` and `mounts` FUSE clients at root/mnt<i>."""

    def __init__(self, root: Path, mounts: int = 2, retry_s: float = 10.0) -> None:
        self.root = root.resolve()
        self.export = self.root / "export"
        self.mountpoints = [self.root / f"mnt{i}" for i in range(mounts)]
        self.retry_s = retry_s
        self._server: subprocess.Popen[bytes] | None = None
        self._clients: list[subprocess.Popen[bytes]] = []
        self._lock: IO[str] | None = None

    def start(self, lock_timeout_s: float = 900.0) -> None:
        if missing():
            raise NfsUnavailable(f"missing {', '.join(missing())}: run `python scripts/nfs_loopback.py install`")
        if not Path("/dev/fuse").exists():
            raise NfsUnavailable("/dev/fuse is missing: the NFS client mounts through FUSE")
        self._take_lock(lock_timeout_s)
        try:
            self.export.mkdir(parents=True, exist_ok=True)
            (self.root / "state").mkdir(exist_ok=True)
            self._start_rpcbind()
            self.start_server()
            for mountpoint in self.mountpoints:
                self._clients.append(self._mount(mountpoint))
        except BaseException:
            self.stop()
            raise

    def _take_lock(self, timeout_s: float) -> None:
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        lock = open(LOCK_PATH, "a+")  # noqa: SIM115 - held open until stop(): the flock lives on it
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as exc:
                if time.monotonic() > deadline:
                    lock.close()
                    raise NfsUnavailable(
                        f"another loopback NFS server holds {LOCK_PATH} for over {timeout_s:.0f} s") from exc
                time.sleep(0.5)
        self._lock = lock

    @staticmethod
    def _start_rpcbind() -> None:
        """Ganesha registers its programs with rpcbind and exits if it cannot; one rpcbind per
        machine serves everyone, so it is started once and left running, like the system daemon."""
        if _port_open(111):
            return
        subprocess.run(["rpcbind", "-w"], check=True)
        deadline = time.monotonic() + 10
        while not _port_open(111):
            if time.monotonic() > deadline:
                raise NfsUnavailable("rpcbind started but port 111 does not answer")
            time.sleep(0.05)

    def start_server(self) -> None:
        """Start (or restart) Ganesha on the same export: file handles stay valid across it."""
        if _port_open(NFS_PORT):
            raise NfsUnavailable(f"port {NFS_PORT} is taken by another NFS server; stop it first")
        config = self.root / "ganesha.conf"
        config.write_text(_CONFIG.format(nfs_port=NFS_PORT, mount_port=MOUNT_PORT, state=self.root / "state",
                                         export=self.export))
        log = self.root / "ganesha.log"
        self._server = subprocess.Popen(
            ["ganesha.nfsd", "-F", "-f", str(config), "-L", str(log), "-p", str(self.root / "ganesha.pid"),
             "-N", "NIV_EVENT"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        _wait("ganesha.nfsd", lambda: _port_open(NFS_PORT) and _port_open(MOUNT_PORT), self._server, log, 30)

    def stop_server(self, sig: int = signal.SIGKILL) -> None:
        """SIGKILL by default: a crash, not a clean shutdown."""
        if self._server is not None and self._server.poll() is None:
            self._server.send_signal(sig)
            self._server.wait(30)
        self._server = None

    def _mount(self, mountpoint: Path) -> subprocess.Popen[bytes]:
        mountpoint.mkdir(parents=True, exist_ok=True)
        if _mounted(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        log = mountpoint.with_suffix(".log")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "nfs_fuse.py"), "--export", str(self.export), "--mountpoint",
                 str(mountpoint), "--nfs-port", str(NFS_PORT), "--mount-port", str(MOUNT_PORT),
                 "--retry-s", str(self.retry_s)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(f"NFS client for {mountpoint}", lambda: _mounted(mountpoint), proc, log, 30)
        return proc

    def rpc_counts(self, mount: int = 0) -> dict[str, int]:
        """RPCs the client of mount `mount` has sent so far, per NFS procedure."""
        stats = json.loads((self.mountpoints[mount] / ".ucm-nfs-stats").read_text())
        counts: dict[str, int] = stats["rpcs"]
        return counts

    def stop(self) -> None:
        for mountpoint, proc in zip(self.mountpoints, self._clients, strict=False):
            if _mounted(mountpoint):
                subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, stderr=subprocess.DEVNULL)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                subprocess.run(["umount", "-l", str(mountpoint)], check=False)
                proc.kill()
                proc.wait(10)
        self._clients = []
        self.stop_server(signal.SIGTERM)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> LoopbackNfs:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="install the Debian packages if missing")
    up = sub.add_parser("up", help="start the server and mount clients; stays in the foreground until Ctrl-C")
    up.add_argument("dir", type=Path)
    up.add_argument("--mounts", type=int, default=2)
    args = parser.parse_args(argv)
    if args.cmd == "install":
        install()
        print("loopback NFS: nfs-ganesha, nfs-ganesha-vfs, rpcbind and fuse3 are installed")
        return 0
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    nfs = LoopbackNfs(args.dir, args.mounts)
    nfs.start()
    print(json.dumps({"export": str(nfs.export), "mounts": [str(m) for m in nfs.mountpoints]}), flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        nfs.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
