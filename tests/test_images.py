"""Checks of images/ that need no Docker daemon: hadolint, the build context, pinning, users, secrets, and that each
Dockerfile installs the project the way pyproject.toml/constraints.txt define it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from idforge.errors import ConfigError
from idforge.ops import images as images_mod

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("Dockerfile.*"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONSTRAINTS = {
    line.split("==")[0].strip().lower().replace("_", "-"): line.split("==")[1].strip()
    for line in (ROOT / "constraints.txt").read_text().splitlines()
    if "==" in line and not line.startswith("#")
}


# ----------------------------------------------------------------------------------------------------------------
# a small Dockerfile reader: instructions with continuation lines joined, grouped by stage


@dataclass
class Instruction:
    cmd: str  # upper case: FROM, RUN, COPY...
    args: str
    line: int


@dataclass
class Stage:
    image: str  # FROM's image with ARGs resolved
    alias: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(ARG defaults declared before the first FROM, stages)."""
    instructions: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker too
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        cmd, _, args = buffer.partition(" ")
        instructions.append(Instruction(cmd.upper(), args.strip(), start))
        buffer = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.cmd == "ARG" and not stages:
            name, _, default = ins.args.partition("=")
            global_args[name] = default
        elif ins.cmd == "FROM":
            parts = [p for p in ins.args.split() if not p.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), parts[0])
            alias = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(image, alias))
        else:
            stages[-1].instructions.append(ins)
    return global_args, stages


def _copy_sources(ins: Instruction) -> list[str] | None:
    """Sources of a COPY/ADD from the build context (None for COPY --from=stage)."""
    tokens = ins.args.split()
    if any(t.startswith("--from=") for t in tokens):
        return None
    tokens = [t for t in tokens if not t.startswith("--")]
    return tokens[:-1]


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:] if negate else line
        pat = pat.strip("/")
        regex = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pat.startswith("**", i):
                regex += ".*"
                i += 2
            elif pat[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pat[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pat[i])
                i += 1
        patterns.append((negate, re.compile(regex + "$")))
    return patterns


def in_build_context(relpath: str) -> bool:
    """Docker's rule: the last pattern matching the path, or any folder above it, decides."""
    parts = relpath.strip("/").split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    included = True
    for negate, regex in _dockerignore_patterns():
        if any(regex.match(p) for p in prefixes):
            included = negate
    return included


def _run_hadolint(path: Path) -> tuple[int, list[dict]]:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    proc = subprocess.run([exe, "--config", str(IMAGES / ".hadolint.yaml"), "--format", "json", str(path)],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, json.loads(proc.stdout or "[]")


# ----------------------------------------------------------------------------------------------------------------


def test_expected_dockerfiles_exist():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.base", "Dockerfile.cpu", "Dockerfile.cuda",
                                             "Dockerfile.mlflow"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    rc, findings = _run_hadolint(dockerfile)
    assert findings == [] and rc == 0, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install requests\nUSER root\n")
    rc, findings = _run_hadolint(bad)
    assert rc != 0
    assert {"DL3007", "DL3003", "DL3013", "DL3002"} <= {f["code"] for f in findings}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_in_the_build_context(dockerfile):
    _, stages = parse_dockerfile(dockerfile.read_text())
    aliases = {s.alias for s in stages if s.alias}
    copied = []
    for stage in stages:
        for ins in stage.all("COPY") + stage.all("ADD"):
            sources = _copy_sources(ins)
            if sources is None:
                src_stage = re.search(r"--from=(\S+)", ins.args).group(1)
                assert src_stage in aliases, f"{dockerfile.name}:{ins.line} copies from unknown stage {src_stage}"
                continue
            for src in sources:
                assert not src.startswith(("/", "..")), f"{dockerfile.name}:{ins.line}: {src} is outside the context"
                assert (ROOT / src).exists(), f"{dockerfile.name}:{ins.line}: COPY source {src} is not in the repo"
                files = [ROOT / src] if (ROOT / src).is_file() else [p for p in (ROOT / src).rglob("*.py")]
                assert files, f"{dockerfile.name}:{ins.line}: {src} holds no files"
                for f in files:
                    rel = f.relative_to(ROOT).as_posix()
                    assert in_build_context(rel), f"{dockerfile.name}:{ins.line}: {rel} is excluded by .dockerignore"
                copied.append(src)
    assert "constraints.txt" in copied


def test_dockerignore_keeps_local_state_out():
    for path in [".venv/bin/python", ".git/HEAD", "data/samples/a.jpg", "outputs/x/metrics.json", "mlruns.db",
                 "tests/test_images.py", ".env", "src/idforge/__pycache__/cli.cpython-311.pyc"]:
        assert not in_build_context(path), path
    for path in ["constraints.txt", "pyproject.toml", "README.md", "src/idforge/cli.py"]:
        assert in_build_context(path), path


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(dockerfile):
    global_args, stages = parse_dockerfile(dockerfile.read_text())
    aliases = set()
    for stage in stages:
        image = stage.image
        if image not in aliases:  # FROM an earlier stage of this file needs no pin
            assert "$" not in image, f"{dockerfile.name}: FROM {image} has an ARG without a default"
            name, _, digest = image.partition("@")
            tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
            assert digest.startswith("sha256:") or (tag and tag != "latest"), f"{dockerfile.name}: FROM {image}"
            if name.startswith("python:"):
                # exact patch release of the project's Python (requires-python >=3.11,<3.12)
                assert re.fullmatch(r"3\.11\.\d+-slim-\w+", tag), f"{dockerfile.name}: {image} is not an exact 3.11"
            else:
                assert name.split(":")[0].startswith("idforge-base"), f"{dockerfile.name}: unexpected base {image}"
        if stage.alias:
            aliases.add(stage.alias)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_non_root(dockerfile):
    _, stages = parse_dockerfile(dockerfile.read_text())
    final_users = [u.args for u in stages[-1].all("USER")]
    assert final_users, f"{dockerfile.name}: the final stage sets no USER"
    user = final_users[-1].split(":")[0]
    assert user not in {"0", "root"}, f"{dockerfile.name}: final USER is {user}"
    assert user.isdigit(), "numeric uid, so Kubernetes' runAsNonRoot can verify it"
    # The uid the image runs as is the one k8s/ pods run as.
    assert user == "1000"


SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|API_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
SECRET_VALUE = re.compile(r"(AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY|ghp_[0-9A-Za-z]{20,}|minioadmin)")


def _env_names(ins: Instruction) -> list[str]:
    if ins.cmd == "ARG":
        return [ins.args.split("=")[0]]
    return re.findall(r"(\w+)=", ins.args) or [ins.args.split()[0]]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_credentials(dockerfile):
    text = dockerfile.read_text()
    _, stages = parse_dockerfile(text)
    for stage in stages:
        for ins in stage.all("ENV") + stage.all("ARG"):
            for name in _env_names(ins):
                assert not SECRET_NAME.search(name), f"{dockerfile.name}:{ins.line}: {name} looks like a credential"
    assert not SECRET_VALUE.search(text)
    assert not SECRET_VALUE.search((IMAGES / "Makefile").read_text())


def test_secret_checks_catch_a_credential():
    _, stages = parse_dockerfile("FROM python:3.11.14-slim-bookworm\nENV AWS_SECRET_ACCESS_KEY=abc \\\n  X=1\n")
    names = _env_names(stages[0].all("ENV")[0])
    assert names == ["AWS_SECRET_ACCESS_KEY", "X"] and SECRET_NAME.search(names[0])
    assert SECRET_VALUE.search("ENV KEY=AKIAABCDEFGHIJKLMNOP")


def _pip_installs(stage: Stage) -> list[Instruction]:
    return [i for i in stage.all("RUN") if "pip install" in i.args]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_install_matches_the_project(dockerfile):
    _, stages = parse_dockerfile(dockerfile.read_text())
    extras_defined = set(PYPROJECT["project"]["optional-dependencies"])
    installs = [(s, i) for s in stages for i in _pip_installs(s)]
    assert installs, f"{dockerfile.name} installs nothing"
    for stage, ins in installs:
        for command in re.split(r"&&", ins.args):
            if "pip install" not in command:
                continue
            tokens = command.split()
            assert "--no-cache-dir" in tokens, f"{dockerfile.name}:{ins.line}: pip cache would land in the layer"
            if "--index-url" in tokens:  # torch, from the PyTorch index, pinned to the version the Makefile installs
                assert re.search(r'"?torch==\$\{TORCH_VERSION\}"?', command), command
                continue
            # Everything else resolves against constraints.txt, copied into this stage before the install.
            assert "-c constraints.txt" in command, f"{dockerfile.name}:{ins.line}: install without constraints"
            copies_before = [c for c in stage.all("COPY") if c.line < ins.line and "constraints.txt" in c.args]
            assert copies_before, f"{dockerfile.name}:{ins.line}: constraints.txt is not copied before the install"
            for extras in re.findall(r'"?\.\[([\w,]+)\]"?', command):
                unknown = set(extras.split(",")) - extras_defined
                assert not unknown, f"{dockerfile.name}:{ins.line}: extras {unknown} are not in pyproject.toml"
            for name, version in re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', command):
                pinned = CONSTRAINTS.get(name.lower().replace("_", "-"))
                assert pinned in (None, version), f"{dockerfile.name}: {name}=={version} but constraints has {pinned}"


def test_torch_and_extras_per_image():
    makefile_torch = re.search(r"TORCH \?= torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    for name, index, extras in [("cpu", "whl/cpu", {"curate", "train", "ops", "eval"}),
                                ("cuda", "whl/${TORCH_CUDA}", {"curate", "train", "ops"})]:
        text = (IMAGES / f"Dockerfile.{name}").read_text()
        assert f"ARG TORCH_VERSION={makefile_torch}" in text, f"Dockerfile.{name} torch differs from the Makefile's"
        assert f"https://download.pytorch.org/{index}" in text
        found = set(re.search(r'"\.\[([\w,]+)\]"', text).group(1).split(","))
        assert found == extras, f"Dockerfile.{name}: {found}"
    assert re.search(r"ARG TORCH_CUDA=cu\d{3}\b", (IMAGES / "Dockerfile.cuda").read_text())


def test_cpu_image_builds_the_matte_venv_the_way_curation_expects():
    text = (IMAGES / "Dockerfile.cpu").read_text()
    assert "create_matte_env('/opt/matte-venv')" in text
    assert "ENV IDFORGE_MATTE_PYTHON=/opt/matte-venv/bin/python" in text
    assert "COPY --from=builder /opt/matte-venv /opt/matte-venv" in text
    from idforge.curate import matte

    assert callable(matte.create_matte_env)
    pins = dict(r.split("==") for r in matte.MATTE_REQUIREMENTS)
    assert pins["mediapipe"] == "0.10.21" and int(pins["numpy"].split(".")[0]) < 2
    # the interpreter that the curate stage resolves in the image is the one the Dockerfile sets
    assert "IDFORGE_MATTE_PYTHON" in Path(matte.__file__).read_text()


# ----------------------------------------------------------------------------------------------------------------
# the image catalog (images/images.yaml) and its readers


def test_catalog_matches_dockerfiles_and_makefile(monkeypatch):
    monkeypatch.delenv("IDFORGE_IMAGE_REGISTRY", raising=False)
    monkeypatch.delenv("IDFORGE_IMAGE_TAG", raising=False)
    raw = yaml.safe_load((IMAGES / "images.yaml").read_text())
    catalog = images_mod.load_images(IMAGES / "images.yaml")
    assert {spec.dockerfile for spec in catalog.images.values()} == {p.name for p in DOCKERFILES}
    makefile = (IMAGES / "Makefile").read_text()
    assert re.search(r"^IMAGES := (.+)$", makefile, re.M).group(1).split() == list(catalog.images)
    for key, spec in catalog.images.items():
        assert spec.name == f"idforge-{key}"  # images/Makefile names them idforge-$(key)
        assert catalog.ref(key) == f"{raw['registry']}/idforge-{key}:{raw['tag']}"
    assert catalog.for_stage("curate") == catalog.ref("cpu")
    assert catalog.for_stage("train-adapter") == catalog.ref("cuda")
    for stage in ("curate", "prepare", "evaluate", "register", "train-adapter", "finetune-identity", "generate"):
        catalog.for_stage(stage)
    with pytest.raises(ConfigError, match="no image in .* lists stage 'paint'"):
        catalog.for_stage("paint")
    with pytest.raises(ConfigError, match="no image 'gpu'"):
        catalog.ref("gpu")


def test_makefile_reads_registry_and_tag_from_the_catalog():
    make = shutil.which("make")
    assert make, "make is needed to build images"
    raw = yaml.safe_load((IMAGES / "images.yaml").read_text())
    out = subprocess.run([make, "-s", "-C", str(IMAGES), "print"], capture_output=True, text=True, check=True).stdout
    assert out.split() == [f"{raw['registry']}/idforge-{k}:{raw['tag']}" for k in raw["images"]]
    out = subprocess.run([make, "-s", "-C", str(IMAGES), "print", "REGISTRY=reg.example:5001/t", "TAG=2026.11.1"],
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[1] == "reg.example:5001/t/idforge-cpu:2026.11.1"
    dry = subprocess.run([make, "-n", "-C", str(IMAGES), "build-cuda", "REGISTRY=r.example/t", "TAG=9"],
                         capture_output=True, text=True, check=True).stdout
    assert "--build-arg BASE_IMAGE=r.example/t/idforge-base:9" in dry
    assert f"-f {IMAGES}/Dockerfile.cuda -t r.example/t/idforge-cuda:9 {ROOT}" in dry


def test_catalog_overrides_and_bad_values(monkeypatch, tmp_path):
    monkeypatch.setenv("IDFORGE_IMAGE_REGISTRY", "localhost:5001/idforge")
    monkeypatch.setenv("IDFORGE_IMAGE_TAG", "dev-3")
    assert images_mod.image_ref("cuda", IMAGES / "images.yaml") == "localhost:5001/idforge/idforge-cuda:dev-3"
    # explicit arguments (the CLI's --registry/--tag) win over the environment
    explicit = images_mod.load_images(IMAGES / "images.yaml", registry="reg.example/x", tag="7")
    assert explicit.ref("cpu") == "reg.example/x/idforge-cpu:7"
    with pytest.raises(ConfigError, match="pinned tag"):
        images_mod.load_images(IMAGES / "images.yaml", tag="latest")
    # found from a subfolder of the repo, as when pipelines are compiled from anywhere inside it
    monkeypatch.chdir(ROOT / "src")
    assert images_mod.find_images_file() == IMAGES / "images.yaml"
    monkeypatch.setenv("IDFORGE_IMAGE_TAG", "latest")
    with pytest.raises(ConfigError, match="pinned tag"):
        images_mod.load_images(IMAGES / "images.yaml")
    monkeypatch.setenv("IDFORGE_IMAGE_TAG", "1")
    monkeypatch.setenv("IDFORGE_IMAGE_REGISTRY", "Not A Registry")
    with pytest.raises(ConfigError, match="not a valid lowercase registry"):
        images_mod.load_images(IMAGES / "images.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="images/images.yaml not found"):
        images_mod.find_images_file()
    monkeypatch.setenv("IDFORGE_IMAGES_FILE", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="is not a file"):
        images_mod.find_images_file()
