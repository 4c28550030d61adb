"""Shared pieces of the reliability suites (tests/project/test_bad_input.py, tests/finetune/test_faults.py).

Builders of broken inputs (truncated, re-typed, NaN, pickled files; fake SD 1.5 checkpoints), on-disk snapshots to
prove a failed command wrote nothing, the lines a terminal would show of a captured stream, a disk-full simulation,
and kill -9 machinery. ``python tests/reliability_helpers.py`` is a small fork server: it imports torch and the
writers once, then for each ``WRITER POINT PATH SEED`` line on stdin forks a child that starts that save, stops at
POINT, prints ``paused PID POINT`` and waits to be killed (milliseconds per kill point instead of a fresh
interpreter's seconds of imports). ``python tests/reliability_helpers.py pause-finetune kill|signal TARGET
ARGS...`` runs ``python -m finetune ARGS`` and pauses the same way right before something is renamed onto TARGET,
until it is killed or until a SIGINT/SIGTERM arrives (then the save and the run go on).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, ItemsView, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

TEMP_PREFIX = ".xlbake-tmp-"  # xlbake.fileio.TEMP_PREFIX, spelled out so that this module imports without xlbake
PAUSE_SECONDS = 600  # a paused child waits this long for its kill
WAIT_SECONDS = 300  # upper bound for a child to reach its pause point on a loaded machine
CHILD_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # one thread: no oversubscription
LORA_NAMES = ("lora_unet_input_blocks_4_1_proj_in", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj")
LORA_SHAPE = (64, 64)  # (out, in) of each synthetic LoRA layer
POINTS = ("mid_write", "before_rename", "after_rename")


# ---------------------------------------------------------------- inputs


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and header metadata."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    return load_file(str(path)), metadata


def edit_safetensors(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Path:
    """Write ``edit(tensors of src)`` to ``dst`` with src's metadata (``edit`` may change the dict in place)."""
    tensors, metadata = read_tensors(src)
    tensors = edit(tensors) or tensors
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst), metadata=metadata)
    return dst


def perturbed_copy(src: Path, dst: Path, scale: float = 1e-2, seed: int = 0) -> Path:
    """``src`` with deterministic noise of relative size ``scale`` added to every floating tensor: a "finetune"."""
    generator = torch.Generator().manual_seed(seed)

    def perturb(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for key, value in tensors.items():
            if value.is_floating_point() and value.numel() > 1:
                noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
                tensors[key] = (value.float() + scale * value.float().std() * noise).to(value.dtype)
        return tensors

    return edit_safetensors(src, dst, perturb)


def truncated_copy(src: Path, dst: Path, fraction: float = 0.6) -> Path:
    """The first ``fraction`` of ``src``'s bytes, as a download cut short leaves it."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


class _MakeFolder:
    """Unpickling this calls os.makedirs(marker): proof that a file was unpickled with full pickle semantics."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return os.makedirs, (str(self.marker),)


def malicious_pickle(path: Path, marker: Path) -> Path:
    """A pickle (any suffix) that creates the folder ``marker`` when unpickled, beside a plausible state dict."""
    path.write_bytes(pickle.dumps({"state_dict": {"weight": torch.zeros(2)}, "payload": _MakeFolder(marker)}))
    return path


def sd15_checkpoint(path: Path) -> Path:
    """A small single-file checkpoint with SD 1.5's layout (CLIP under cond_stage_model, no label_emb)."""
    tensors = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 16),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(16),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
    }
    save_file(tensors, str(path))
    return path


def lora_factors(seed: int = 0, rank: int = 8) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (up (out, r), down (r, in)) of a small synthetic kohya LoRA."""
    generator = torch.Generator().manual_seed(seed)
    out, inp = LORA_SHAPE
    return {
        name: (torch.randn(out, rank, generator=generator), torch.randn(rank, inp, generator=generator) / inp)
        for name in LORA_NAMES
    }


def write_test_lora(path: Path, seed: int = 0, rank: int = 8, force: bool = False) -> Path:
    """A small valid kohya LoRA written by the real writer (xlbake.lora.io.write_lora)."""
    from xlbake.lora.io import lora_metadata, write_lora

    factors = lora_factors(seed, rank)
    metadata = lora_metadata(title=path.stem, ranks={name: rank for name in factors}, alpha=rank, conv_rank=None)
    return write_lora(path, factors, metadata=metadata, dtype=torch.float32, force=force)


def loha(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    name = "lora_unet_input_blocks_4_1_proj_in"
    return {
        f"{name}.hada_w1_a": torch.ones(8, 2),
        f"{name}.hada_w1_b": torch.ones(2, 8),
        f"{name}.alpha": torch.ones(()),
    }


def set_item(key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.__setitem__(key, make(tensors[key]))


def nan_at(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


def drop_prefix(prefix: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda tensors: {k: v for k, v in tensors.items() if not k.startswith(prefix)}


# ---------------------------------------------------------------- observations

Snapshot = dict[str, tuple[int, int] | None]


def snapshot(root: Path) -> Snapshot:
    """Every file and folder under ``root``: relative path -> (size, mtime_ns) for a file (a rewrite or an atomic
    replace changes it), None for a folder: its presence counts (an empty run folder left by a failed run is
    written), not its mtime, which any entry added and removed inside moves (those are judged by themselves)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): None if p.is_dir() else (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    """Readable differences between two snapshots: ``+new``, ``-removed``, ``~modified``."""
    added = [f"+{p}" for p in after if p not in before]
    removed = [f"-{p}" for p in before if p not in after]
    modified = [f"~{p}" for p in before if p in after and before[p] != after[p]]
    return added + removed + modified


def temp_files(root: Path) -> list[Path]:
    """Temp files and staging folders of xlbake's atomic writers anywhere under ``root``."""
    return sorted(p for p in root.rglob(f"{TEMP_PREFIX}*"))


def visible_lines(text: str) -> list[str]:
    """The non-empty lines a terminal shows for ``text``: carriage returns overwrite from the first column, so a
    progress bar that cleared itself does not count and one left standing does."""
    shown = []
    for line in text.split("\n"):
        screen = ""
        for part in line.split("\r"):
            screen = part + screen[len(part) :]
        if screen.strip():
            shown.append(screen.strip())
    return shown


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail with the kernel's EFBIG (SIGXFSZ ignored), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


# ---------------------------------------------------------------- kill -9 fork server


def _pause(point: str) -> None:
    print(f"paused {os.getpid()} {point}", flush=True)
    time.sleep(PAUSE_SECONDS)
    os._exit(3)  # never killed: the parent notices the exit code


def _wait_for_signal(point: str) -> None:
    """Print ``paused`` and wait for SIGINT/SIGTERM, then go on; the handlers installed before still run."""
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def record(signum: int, frame: object) -> None:
        received.append(signum)
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)

    for sig in previous:
        signal.signal(sig, record)
    print(f"paused {os.getpid()} {point}", flush=True)
    while not received:
        time.sleep(0.01)
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _pause_on_replace(target: Path, wait: Callable[[str], None] = _pause) -> None:
    """Pause right before ``os.replace`` moves something onto ``target`` (everything written, nothing renamed)."""
    real = os.replace

    def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        if Path(dst) == target:
            wait("before_rename")
        real(src, dst)

    os.replace = replace  # type: ignore[assignment]


def _pause_after_replace(target: Path) -> None:
    """Pause right after ``os.replace`` put the new file at ``target`` (before the folder is fsynced)."""
    real = os.replace

    def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        real(src, dst)
        if Path(dst) == target:
            _pause("after_rename")

    os.replace = replace  # type: ignore[assignment]


class _PausingTensors(Mapping[str, torch.Tensor]):
    """Tensors handed to a streaming writer; fetching the middle one pauses it with half the file written."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors, self.fetched = tensors, 0

    def __getitem__(self, key: str) -> torch.Tensor:
        self.fetched += 1
        if self.fetched == len(self.tensors) // 2:
            _pause("mid_write")
        return self.tensors[key]

    def items(self) -> ItemsView[str, torch.Tensor]:  # the writer reads shapes and dtypes here, uncounted
        return self.tensors.items()

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def sgm_tensors(seed: int) -> dict[str, torch.Tensor]:
    """A stand-in SGM state dict (a few hundred KB) for checkpoint writes."""
    generator = torch.Generator().manual_seed(seed)
    return {f"model.diffusion_model.layer{i:02d}.weight": torch.randn(64, 64, generator=generator) for i in range(24)}


def save_version(writer: str, path: Path, seed: int, point: str | None = None) -> None:
    """Write version ``seed`` of ``writer``'s output at ``path``, stopping at ``point`` if given."""
    if point == "before_rename":
        _pause_on_replace(path)
    elif point == "after_rename":
        _pause_after_replace(path)
    if writer == "lora":
        import xlbake.lora.io

        if point == "mid_write":  # the writer streams module by module: stop it with half of them on disk
            real_stream = xlbake.lora.io.stream_safetensors

            def half_then_pause(out, path, specs, fetch, *, metadata):  # noqa: ANN001, ANN202 (same as the real one)
                later = set(sorted(specs)[len(specs) // 2 :])

                def fetch_or_pause(name: str) -> torch.Tensor:
                    if name in later:
                        out.flush()
                        _pause("mid_write")
                    return fetch(name)

                return real_stream(out, path, specs, fetch_or_pause, metadata=metadata)

            xlbake.lora.io.stream_safetensors = half_then_pause
        write_test_lora(path, seed=seed, force=True)
    elif writer == "sgm":
        from xlbake.sdxl.checkpoint import save_sgm_checkpoint

        tensors = sgm_tensors(seed)
        source = _PausingTensors(tensors) if point == "mid_write" else tensors
        save_sgm_checkpoint(source, path, force=True)
    else:
        _save_state_version(path, seed, point)


def _save_state_version(final: Path, seed: int, point: str | None) -> None:
    """A training state ``final`` (= root/step-NNNNNNNN) through finetune.state.write_state."""
    from finetune.state import TrainerState, write_state

    def save_accelerate(folder: Path) -> None:
        save_file(sgm_tensors(seed), str(folder / "model.safetensors"))
        if point == "mid_write":
            _pause("mid_write")

    step = int(final.name.split("-")[1])
    write_state(final.parent, TrainerState(global_step=step, losses=[float(seed)]), save_accelerate, {}, keep=5)


def serve() -> None:
    """Fork a paused writer for each ``WRITER POINT PATH SEED`` line on stdin (see the module docstring)."""
    import xlbake.lora.io  # noqa: F401
    import xlbake.sdxl.checkpoint  # noqa: F401  (imported once, before any fork)
    from finetune import state  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed children are reaped by the kernel
    print("ready", flush=True)
    for line in sys.stdin:
        writer, point, path, seed = line.split()
        if os.fork() == 0:
            try:
                save_version(writer, Path(path), int(seed), point)
                print(f"finished {os.getpid()} without reaching {point}", flush=True)
            except BaseException as exc:
                print(f"failed {os.getpid()} {type(exc).__name__}: {exc}", flush=True)
            finally:
                os._exit(4)


class ForkServer:
    """``python tests/reliability_helpers.py``: forks paused writers on request."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=CHILD_ENV
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.lines.get(timeout=WAIT_SECONDS) == "ready"

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.strip())

    def pause(self, writer: str, point: str, path: Path, seed: int) -> int:
        """Start saving version ``seed`` of ``writer`` at ``path``; return the pid of the child paused at ``point``."""
        self.process.stdin.write(f"{writer} {point} {path} {seed}\n")
        self.process.stdin.flush()
        answer = self.lines.get(timeout=WAIT_SECONDS)
        assert answer.startswith("paused ") and answer.endswith(point), answer
        return int(answer.split()[1])

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=WAIT_SECONDS)


def kill_9(pid: int) -> None:
    """SIGKILL ``pid`` and wait until it is gone."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + WAIT_SECONDS
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not Path(f"/proc/{pid}").exists()


def tensors_equal(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same tensors, bit for bit (metadata aside)."""
    first, second = load_file(str(a)), load_file(str(b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def pause_finetune(until: str, target: str, args: list[str]) -> None:
    """Run ``python -m finetune ARGS``, pausing right before anything is renamed onto ``target`` until killed
    (``until`` = kill) or until SIGINT/SIGTERM arrives, after which the save and the run go on (``until`` = signal)."""
    _pause_on_replace(Path(target), _pause if until == "kill" else _wait_for_signal)
    from finetune.cli import main

    main(args, prog_name="python -m finetune")


if __name__ == "__main__":
    if sys.argv[1:2] == ["pause-finetune"]:
        pause_finetune(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        serve()
