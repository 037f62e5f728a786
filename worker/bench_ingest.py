"""``triage bench ingest``: our receiver against dcmtk's storescp and Orthanc, with the same files, same sender.

dcmtk's storescu sends the same MR files (256×256, 16-bit, as in shared/reference/performance.md §1) over loopback
to each receiver in turn, on one association (or ``--associations`` at once, the files split between them),
``--repeats`` times; the median is reported. Our receiver is run
with both engines (``scp.engine``): ``ours_*`` is the dcmtk engine (storescp on the wire, our checks and
bookkeeping behind it), ``ours_pynetdicom_*`` the in-process pynetdicom SCP. For our receiver the clock stops when
every image is both acknowledged and recorded in the database (what completion waits for), and its CPU time per
image (the service process and the storescp processes it ran) is read from /proc. Every DCMTK-based process runs with ``TCP_NODELAY=1``: Debian's dcmtk
otherwise leaves Nagle's algorithm on and all figures become latency-bound.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

from worker.processes import stop_process_groups

REPO = Path(__file__).resolve().parents[1]
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def write_files(folder: Path, count: int, size: int = 256) -> list[Path]:
    """``count`` single-slice MR files of one series (distinct SOP Instance UIDs, same pixel payload size)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    paths = []
    for index in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "MR", "AX T2", 1, index + 1
        ds.PatientName, ds.PatientID = "BENCH^INGEST", "BENCH"
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, float(index)]
        ds.PixelSpacing, ds.SliceThickness = [1, 1], 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        path = folder / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _send(folders: list[Path], port: int, called: str) -> float:
    """Seconds for one storescu per folder, all at once (one association each), to send everything."""
    start = time.perf_counter()
    senders = [subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", called, "+sd", "127.0.0.1", str(port),
                                 str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=DCMTK_ENV) for folder in folders]
    failures = []
    for sender in senders:
        _, stderr = sender.communicate(timeout=1800)
        if sender.returncode != 0:
            failures.append(stderr[-500:])
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"storescu to {called} failed: {failures[0]}")
    return elapsed


def _cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and all its descendants: those running (the dcmtk engine's intake processes)
    and those that have ended and were waited for (its storescp processes)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), sum(int(value) for value in fields[11:15]))
    tree, total, frontier = {pid}, 0, [pid]
    while frontier:
        parent = frontier.pop()
        total += stats.get(parent, (0, 0))[1]
        children = [child for child, (ppid, _) in stats.items() if ppid == parent and child not in tree]
        tree.update(children)
        frontier.extend(children)
    return total / os.sysconf("SC_CLK_TCK")


def bench_dcmtk(folders: list[Path], work: Path) -> float:
    port = _free_port()
    out = work / "storescp"
    out.mkdir()
    # One process per association when there are several (storescp alone serves one association at a time).
    fork = ["--fork"] if len(folders) > 1 else []
    process = subprocess.Popen(["storescp", *fork, "-aet", "STORESCP", "+B", "-od", str(out), str(port)], env=DCMTK_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait(lambda: _port_open(port), 30, "storescp")
        return _send(folders, port, "STORESCP")
    finally:
        stop_process_groups(process)
        shutil.rmtree(out, ignore_errors=True)


def bench_orthanc(folders: list[Path], work: Path) -> float:
    http_port, dicom_port = _free_port(), _free_port()
    storage = work / "orthanc"
    config = {"Name": "bench", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
              "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
              "Plugins": []}
    config_path = work / "orthanc.json"
    config_path.write_text(json.dumps(config))
    process = subprocess.Popen([shutil.which("Orthanc") or "/usr/sbin/Orthanc", str(config_path)], env=DCMTK_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def alive() -> bool:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/system", timeout=2).read()
                return True
            except OSError:
                return False

        _wait(alive, 60, "Orthanc")
        return _send(folders, dicom_port, "ORTHANC")
    finally:
        stop_process_groups(process)
        shutil.rmtree(storage, ignore_errors=True)


def bench_ours(folders: list[Path], work: Path, count: int, database_url: str | None,
               engine: str = "dcmtk", fsync: bool = True) -> tuple[float, float]:
    """Seconds until all images are acknowledged and in the database, and the receiver's CPU seconds.

    ``fsync=False`` measures the receiver without its durability (``store.fsync: false``): the difference is what
    "Success means durable" costs on this disk, which neither peer pays (storescp and Orthanc do not fsync)."""
    from sqlalchemy import create_engine, func, select

    from sql.database import upgrade
    from sql.schema import instances

    var = work / "ours"
    url = database_url or f"sqlite:///{var / 'triage.db'}"
    upgrade(url)
    port = _free_port()
    config = {"var_dir": str(var), "database": {"url": url}, "scp": {"port": port, "engine": engine},
              "metrics": {"serve_port": 0}, "store": {"fsync": fsync}, "assembly": {"quiet_period_s": 3600, "max_wait_s": 36000}}
    config_path = work / "triage.yaml"
    config_path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen([sys.executable, "-m", "worker.cli", "serve"], cwd=REPO,
                               env={**os.environ, "TRIAGE_CONFIG": str(config_path)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    engine = create_engine(url)
    try:
        _wait(lambda: _port_open(port), 120, "our SCP")
        cpu_before = _cpu_seconds(process.pid)
        start = time.perf_counter()
        _send(folders, port, "TRIAGE")

        def recorded() -> bool:
            with engine.connect() as c:
                return c.execute(select(func.count()).select_from(instances)).scalar_one() >= count

        _wait(recorded, 600, "the images to be recorded")
        elapsed = time.perf_counter() - start
        time.sleep(0.5)  # the last storescp process is reaped (its CPU time counts once it has been waited for)
        return elapsed, _cpu_seconds(process.pid) - cpu_before
    finally:
        engine.dispose()
        stop_process_groups(process)
        shutil.rmtree(var, ignore_errors=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="triage bench ingest")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--associations", type=int, default=1,
                        help="send over this many associations at once (the files split between them)")
    parser.add_argument("--database-url", help="record into this database (default: a fresh SQLite file)")
    parser.add_argument("--without-fsync", action="store_true",
                        help="also measure each engine with store.fsync off, to show what durability costs")
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (run ops/setup.sh)", file=sys.stderr)
            return 2
    peers = {"dcmtk": [], "orthanc": []}
    variants = [(engine, True) for engine in ENGINES]
    if args.without_fsync:
        variants += [(engine, False) for engine in ENGINES]
    ours = {variant: ([], []) for variant in variants}  # (engine, fsync) -> (seconds, CPU seconds) per repeat
    with tempfile.TemporaryDirectory(prefix="triage-bench-ingest-") as tmp:
        work = Path(tmp)
        files = write_files(work / "files", args.images)
        folders = [work / "files" / f"association-{n}" for n in range(max(1, args.associations))]
        for folder in folders:
            folder.mkdir()
        for index, path in enumerate(files):
            path.rename(folders[index % len(folders)] / path.name)
        size_mb = sum(p.stat().st_size for p in (work / "files").rglob("*.dcm")) / 1e6
        for repeat in range(args.repeats):
            peers["dcmtk"].append(bench_dcmtk(folders, work))
            peers["orthanc"].append(bench_orthanc(folders, work))
            for engine, fsync in variants:
                elapsed, cpu_seconds = bench_ours(folders, work, args.images, args.database_url, engine, fsync)
                ours[engine, fsync][0].append(elapsed)
                ours[engine, fsync][1].append(cpu_seconds)
            print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    n = args.images

    def rate(seconds: list[float]) -> float:
        return round(n / statistics.median(seconds), 1)

    def cpu_ms(cpu_seconds: list[float]) -> float:
        return round(1000 * statistics.median(cpu_seconds) / n, 2)

    result = {
        "images": n, "megabytes": round(size_mb, 1), "repeats": args.repeats, "associations": len(folders),
        # "ours" is the receiver engine for high image rates (scp.engine: dcmtk); the in-process pynetdicom SCP
        # (the default engine) is reported beside it.
        "engine": "dcmtk",
        "ours_images_per_s": rate(ours["dcmtk", True][0]),
        "dcmtk_images_per_s": rate(peers["dcmtk"]),
        "orthanc_images_per_s": rate(peers["orthanc"]),
        "ours_cpu_ms_per_image": cpu_ms(ours["dcmtk", True][1]),
        "ours_pynetdicom_images_per_s": rate(ours["pynetdicom", True][0]),
        "ours_pynetdicom_cpu_ms_per_image": cpu_ms(ours["pynetdicom", True][1]),
    }
    if args.without_fsync:
        result["ours_without_fsync_images_per_s"] = rate(ours["dcmtk", False][0])
        result["ours_pynetdicom_without_fsync_images_per_s"] = rate(ours["pynetdicom", False][0])
    result["ratio_vs_orthanc"] = round(result["ours_images_per_s"] / result["orthanc_images_per_s"], 3)
    result["ratio_vs_dcmtk"] = round(result["ours_images_per_s"] / result["dcmtk_images_per_s"], 3)
    result["pynetdicom_ratio_vs_orthanc"] = round(
        result["ours_pynetdicom_images_per_s"] / result["orthanc_images_per_s"], 3)
    print(json.dumps(result))
    return 0


#: Our receiver engines, each measured in every repeat.
ENGINES = ("dcmtk", "pynetdicom")
