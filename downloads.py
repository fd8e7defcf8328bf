"""Data sets downloaded, for the image experiments: archives fetched with a progress bar, checked against their
published digests and extracted once, whole, by one process at a time (lenet_imagewoof.py, cifar.py); and
MNIST's original files written in Imagewoof's layout, the stand-in of the README's LeNet results
(lenet_imagewoof.py --data mnist)."""
import contextlib
import errno
import gzip
import hashlib
import math
import os
import shutil
import tarfile
import urllib.request

import numpy as np

import report
from experiment import InputError, log

# == Archives: downloaded with a progress bar, verified, extracted once ============================

def matches(path, digests):
    """Whether the file's digest is one of `digests` (name -> hex)."""
    hashes = {name: hashlib.new(name) for name in digests}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            for h in hashes.values():
                h.update(chunk)
    return any(hashes[name].hexdigest() == value for name, value in digests.items())

def download(url, path, instead):
    """url -> path, with a progress bar; path appears only when the download is whole (as many bytes as the
    server announced), else stays absent with one line said. Without a network one line, ending with instead:
    what the user can do."""
    try:
        with urllib.request.urlopen(url) as response, report.written_whole(path) as part, open(part, "wb") as f:
            total, done = int(response.headers.get("Content-Length") or 0), 0
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
                done += len(chunk)
                if total:
                    bar = "#" * (30 * done // total)
                    print(f"\r  {path.name} [{bar:<30}] {done / 2**20:.0f}/{total / 2**20:.0f} MiB", end="", flush=True)
            print()
            if total and done != total:
                raise EOFError(f"the download stopped at {done} of {total} bytes")  # written_whole keeps nothing
    except EOFError as e:
        log.info(str(e))
    except OSError as e:  # URLError, a connection cut, a full disk
        raise InputError(f"cannot download {url} ({e}); {instead}") from None

def made_once(root, name, make):
    """root/name, made once and whole: make(scratch) writes it under a scratch folder and returns the folder that
    becomes root/name. One process at a time: torchrun's other ranks wait for the first, then find it there. The
    holder of the lock removes its file when done, made or failed; one who then gets the lock of a removed file
    opens it anew (the usual recheck of the lock file's inode), so that two never make root/name at once."""
    target = root / name
    if target.is_dir():  # before any lock: a --root that is only read, such as a shared copy, serves as it is
        return target
    path, made = root / f".{name}.lock", [p for p in [root, *root.parents] if not p.exists()]  # deepest first
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(path, "a")
    except OSError as e:
        raise InputError(f"cannot write {name} into --root {root} ({e.strerror}); use another --root") from None
    if os.name == "posix":
        import fcntl
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(f"waiting for another process to write {target}")
            fcntl.flock(lock, fcntl.LOCK_EX)  # let go when the file closes, also when the process dies
        try:
            ours = os.path.samestat(os.stat(path), os.fstat(lock.fileno()))  # the lock held is the file's
        except FileNotFoundError:
            ours = False
        if not ours:  # its holder removed it when done: try again, with the file there now (or none)
            lock.close()
            return made_once(root, name, make)
    try:
        if not target.is_dir():  # whoever held the lock before may have made it
            scratch = root / f".{name}.partial"
            shutil.rmtree(scratch, ignore_errors=True)  # what a killed process left
            try:
                make(scratch).replace(target)
            finally:  # a make that failed leaves no half-made folder behind
                shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if os.name != "posix":
            lock.close()  # Windows removes no file that is open (and there is no lock to keep)
        with contextlib.suppress(OSError):  # open elsewhere, where that forbids it (Windows)
            path.unlink(missing_ok=True)  # on posix while the lock is held: a waiter then opens the file anew
        lock.close()
        for folder in made:  # the folders made here, if a failure left them empty: refused input writes nothing
            with contextlib.suppress(OSError):
                folder.rmdir()
    return target

def verified(url, path, digests, instead):
    """path, downloaded from url unless it is there and matches `digests` (tried twice). A file there that does
    not match is never deleted, only replaced by a whole download; instead: what to do without a network."""
    if path.exists():
        if matches(path, digests):
            return path
        log.info(f"{path} does not match its published checksum; downloading it again")
        instead = f"{path} is there but is not the published file (its checksum differs); {instead}"
    for _ in range(2):
        log.info(f"downloading {url}")
        download(url, path, instead)  # path replaced only by a whole download
        if path.exists() and matches(path, digests):
            return path
    raise InputError(f"{url} came short or did not match its published checksum twice; not using it")

def fetch(root, url, digests, folder):
    """root/folder, extracted from the archive at url: downloaded and verified, extracted once, whole or not
    at all."""
    def extract(scratch):
        name = url.rsplit("/", 1)[1]
        archive = verified(url, root / name, digests, f"put {name} into {root} yourself, or pass --data DIR with "
                           "its extracted copy")
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(scratch, filter="data")  # refuses absolute paths and links out of scratch
        except (tarfile.TarError, OSError, EOFError) as e:
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # not the archive's
                e.filename = e.filename or str(scratch)  # fault: experiment.main's one line says where
                raise
            raise InputError(f"{archive} is not a readable archive ({e}); delete it to fetch it again") from None
        if not (scratch / folder).is_dir():
            raise InputError(f"{archive} holds no {folder} folder")
        return scratch / folder
    return made_once(root, folder, extract)

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's copy of MNIST's original files
MNIST_MD5 = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}

def read_idx(path):
    """The uint8 array of one of MNIST's gzipped IDX files: images (n, 28, 28) or labels (n,)."""
    try:
        raw = gzip.decompress(path.read_bytes())
        kind, dims = raw[2], raw[3]  # 8: unsigned bytes; the number of dimensions
        shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
        if raw[:2] != b"\0\0" or kind != 8 or len(raw) != 4 + 4 * dims + math.prod(shape):
            raise ValueError("not IDX")
    except (OSError, EOFError, IndexError, ValueError):
        raise InputError(f"{path} is not one of MNIST's IDX files; delete it to fetch it again") from None
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)

def mnist_folder(root, train_per_class=600, test_per_class=200):
    """MNIST in the Imagewoof layout, the stand-in for Imagewoof of the README's LeNet results: the first
    train_per_class training and test_per_class test images of each digit in MNIST's original files, as RGB
    JPEGs (quality 95) in train/digit<d>/ and val/digit<d>/ of root/mnist-<train>-<test>, written once, whole."""
    from PIL import Image
    name = f"mnist-{train_per_class}-{test_per_class}"

    def write(scratch):
        instead = (f"put MNIST's four files ({', '.join(MNIST_MD5)}; torchvision's MNIST/raw holds them) into {root} "
                   "yourself, or pass --data DIR with images in Imagewoof's layout")
        files = {name: read_idx(verified(MNIST_URL + name, root / name, {"md5": md5}, instead))
                 for name, md5 in MNIST_MD5.items()}
        log.info(f"writing MNIST's images to {root / name}")
        for split, prefix, per_class in (("train", "train", train_per_class), ("val", "t10k", test_per_class)):
            x, y = files[f"{prefix}-images-idx3-ubyte.gz"], files[f"{prefix}-labels-idx1-ubyte.gz"]
            for digit in range(10):
                (scratch / split / f"digit{digit}").mkdir(parents=True)
                for j, i in enumerate(np.flatnonzero(y == digit)[:per_class]):
                    Image.fromarray(np.repeat(x[i][..., None], 3, 2)).save(
                        scratch / split / f"digit{digit}" / f"{j}.JPEG", quality=95)
        return scratch
    return made_once(root, name, write)
