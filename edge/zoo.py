"""Model folders: find them, read their manifest, build their modules, hash their content.

A model folder (DESIGN.md, "A model folder") holds ``manifest.toml``, ``model.py``
(``Backbone`` and ``Head`` nn.Modules), ``weights.safetensors`` (keys prefixed
``backbone.`` and ``head.``), ``train.py`` and ``CARD.md``. Shipped models are found
by name in the repository's ``models/`` (when running from a checkout) or the installed
``edge_models`` package.

Reading a folder needs no torch: weights come back as numpy arrays (``arrays``), and
torch is imported only to build the modules (``build``, ``state_dicts``), so a daemon
serving a compiled artifact stays lean.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from edge.errors import ModelError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

DEFAULT_MODEL = "vibration"


@dataclass(frozen=True)
class Manifest:
    """The typed content of ``manifest.toml``."""

    name: str
    version: str
    channels: int
    window: int
    sample_rate: float
    channel_names: tuple[str, ...]
    task: str  # "classification" | "forecast" | "regression"
    classes: tuple[str, ...]
    outputs: int  # classes for classification, horizon*channels (or 1) for regression
    feature_size: int
    head_kind: str
    parity: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    #: ``[serve]``: ``precision = "fp32"`` restricts serving to fp32 artifacts
    serve: dict[str, Any] = field(default_factory=dict)
    #: ``[eval]``: labelled check data (``generator`` or ``file``) for accuracy checks
    eval: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str) -> "Manifest":
        try:
            inp, task, feats, head = d["input"], d["task"], d["features"], d["head"]
            kind = task["kind"]
            classes = tuple(task.get("classes", ()))
            outputs = int(task.get("outputs", len(classes)))
            m = cls(
                name=str(d["name"]),
                version=str(d["version"]),
                channels=int(inp["channels"]),
                window=int(inp["window"]),
                sample_rate=float(inp["sample_rate"]),
                channel_names=tuple(inp.get("channel_names", [f"ch{i}" for i in range(int(inp["channels"]))])),
                task=str(kind),
                classes=classes,
                outputs=outputs,
                feature_size=int(feats["size"]),
                head_kind=str(head.get("kind", "linear")),
                parity=dict(d.get("parity", {})),
                calibration=dict(d.get("calibration", {})),
                serve=dict(d.get("serve", {})),
                eval=dict(d.get("eval", {})),
                metrics=dict(d.get("metrics", {})),
                raw=d,
            )
        except KeyError as e:
            raise ModelError(f"{where}: manifest is missing the key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelError(f"{where}: manifest has a bad value: {e}") from None
        if m.task not in ("classification", "forecast", "regression"):
            raise ModelError(f"{where}: task.kind {m.task!r} is not one of classification, forecast, regression")
        if m.task == "classification" and len(m.classes) < 2:
            raise ModelError(f"{where}: a classification task needs task.classes with at least 2 names")
        if m.channels < 1 or m.window < 2 or m.sample_rate <= 0 or m.feature_size < 1 or m.outputs < 1:
            raise ModelError(f"{where}: input.channels, input.window, input.sample_rate, features.size and outputs must be positive")
        if str(m.serve.get("precision", "auto")) not in ("auto", "fp32", "fp16", "int8"):
            raise ModelError(f"{where}: serve.precision {m.serve['precision']!r} is not one of auto, fp32, fp16, int8")
        if len(m.channel_names) != m.channels:
            raise ModelError(f"{where}: input.channel_names has {len(m.channel_names)} names for {m.channels} channels")
        return m


class ModelFolder:
    """One model folder on disk. Cheap to create; modules are built on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        mp = self.path / "manifest.toml"
        if not mp.is_file():
            raise ModelError(f"{self.path}: not a model folder (no manifest.toml)")
        try:
            data = tomllib.loads(mp.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{mp}: invalid TOML: {e}") from None
        self.manifest = Manifest.from_dict(data, where=str(mp))

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r})"

    @cached_property
    def content_hash(self) -> str:
        """sha256 over manifest, model code and weights: the key of compiled artifacts."""
        h = hashlib.sha256()
        for name in ("manifest.toml", "model.py", "weights.safetensors"):
            p = self.path / name
            h.update(name.encode())
            h.update(p.read_bytes() if p.exists() else b"")
        return h.hexdigest()

    @cached_property
    def module(self):
        """The folder's ``model.py`` imported under a private, unique module name."""
        src = self.path / "model.py"
        if not src.is_file():
            raise ModelError(f"{self.path}: model folder has no model.py")
        modname = f"_edge_model_{self.content_hash[:12]}"
        if modname in sys.modules:
            return sys.modules[modname]
        spec = importlib.util.spec_from_file_location(modname, src)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[modname] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as e:  # a user's model.py may fail in any way
            del sys.modules[modname]
            raise ModelError(f"{src}: importing model.py failed: {type(e).__name__}: {e}") from e
        for cls in ("Backbone", "Head"):
            if not hasattr(mod, cls):
                raise ModelError(f"{src}: model.py defines no {cls} class")
        return mod

    def arrays(self) -> tuple[dict, dict]:
        """(backbone, head) weights as numpy arrays, read with safetensors' numpy API (no torch)."""
        from safetensors.numpy import load_file

        wp = self.path / "weights.safetensors"
        if not wp.is_file():
            raise ModelError(f"{self.path}: model folder has no weights.safetensors (run its train.py)")
        try:
            tensors = load_file(str(wp))
        except Exception as e:
            raise ModelError(f"{wp}: cannot read weights: {e}") from e
        bb = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
        hd = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
        if not bb or not hd:
            raise ModelError(f"{wp}: weights need keys prefixed 'backbone.' and 'head.'")
        return bb, hd

    def state_dicts(self) -> tuple[dict, dict]:
        """(backbone, head) torch tensors: ``arrays`` converted, for ``load_state_dict``."""
        import torch

        bb, hd = self.arrays()
        return ({k: torch.from_numpy(v) for k, v in bb.items()}, {k: torch.from_numpy(v) for k, v in hd.items()})

    def build(self):
        """(backbone, head) nn.Modules in eval mode with the shipped weights loaded."""
        m = self.manifest
        bb = self.module.Backbone(m)
        hd = self.module.Head(m)
        bsd, hsd = self.state_dicts()
        try:
            bb.load_state_dict(bsd)
            hd.load_state_dict(hsd)
        except RuntimeError as e:
            raise ModelError(f"{self.path}: weights do not fit model.py: {e}") from e
        return bb.eval(), hd.eval()


def zoo_roots() -> list[Path]:
    """Where shipped models live: the repository's ``models/`` first, then ``edge_models``.

    A checkout (or a worktree) sees its own models even when another copy of the package
    is installed; a plain install has no ``models/`` next to ``edge`` and uses the
    installed ``edge_models`` distribution.
    """
    roots = []
    repo = Path(__file__).resolve().parent.parent / "models"
    if repo.is_dir():
        roots.append(repo)
    try:
        import edge_models  # installed (non-editable or editable) distribution

        installed = Path(edge_models.__file__).parent.resolve()
        if installed not in [r.resolve() for r in roots]:
            roots.append(installed)
    except ImportError:
        pass
    return roots


def shipped_models() -> dict[str, Path]:
    """Name -> folder of every shipped model."""
    out: dict[str, Path] = {}
    for root in zoo_roots():
        for p in sorted(root.iterdir()):
            if (p / "manifest.toml").is_file():
                out.setdefault(p.name, p)
    return out


def folder_digest(path: str | Path) -> str:
    """sha256 over every file of a model folder (relative paths and contents, sorted; no
    ``__pycache__``): what ``[model] sha256`` pins, since every ``.py`` there can run as code.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "manifest.toml").write_text("name = 'x'")
    >>> len(folder_digest(d))
    64
    """
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and "__pycache__" not in q.parts):
        rel = p.relative_to(root).as_posix().encode()
        data = p.read_bytes()
        h.update(len(rel).to_bytes(4, "big") + rel + len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def check_pin(model: "ModelFolder", expected: str) -> None:
    """Refuse a model folder whose content is not the pinned one (before any of its code runs)."""
    if not expected:
        return
    got = folder_digest(model.path)
    if got != expected.strip().lower():
        raise ModelError(f"model folder {model.path} does not match [model] sha256 = {expected[:16]}... "
                         f"(its content is {got[:16]}...): refusing to load code that is not the pinned one")


def resolve_model(ref: str | Path | None) -> ModelFolder:
    """A model folder from a path, a shipped model's name, or None for the default model."""
    ref = DEFAULT_MODEL if ref is None or str(ref) == "" else ref
    p = Path(ref).expanduser()
    if (p / "manifest.toml").is_file():
        return ModelFolder(p)
    shipped = shipped_models()
    if str(ref) in shipped:
        return ModelFolder(shipped[str(ref)])
    raise ModelError(
        f"model {str(ref)!r} is neither a model folder nor a shipped model "
        f"(shipped: {', '.join(sorted(shipped)) or 'none'})"
    )


def save_weights(folder: str | Path, backbone, head) -> tuple[int, int]:
    """Write ``weights.safetensors`` (keys ``backbone.*`` and ``head.*``) into a model folder.

    Returns (parameters, bytes written): what a training recipe reports in its card.
    """
    from safetensors.torch import save_file

    path = Path(folder) / "weights.safetensors"
    tensors = {f"backbone.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    tensors.update({f"head.{k}": v.contiguous() for k, v in head.state_dict().items()})
    save_file(tensors, str(path))
    n_params = sum(p.numel() for p in backbone.parameters()) + sum(p.numel() for p in head.parameters())
    return n_params, path.stat().st_size


def write_metrics(folder: str | Path, metrics: dict[str, Any], card_block: str) -> None:
    """Replace the manifest's ``[metrics]`` table and the CARD's block between
    ``<!-- metrics:start`` and ``<!-- metrics:end -->`` (both written by ``train.py``)."""
    import re

    folder = Path(folder)
    mp = folder / "manifest.toml"
    text = mp.read_text().split("[metrics]")[0].rstrip() + "\n\n[metrics]\n"
    text += "".join(f"{k} = {v!r}\n" for k, v in metrics.items())
    mp.write_text(text)
    card = folder / "CARD.md"
    if card.exists():
        block = f"<!-- metrics:start (written by train.py) -->\n{card_block}\n<!-- metrics:end -->"
        card.write_text(re.sub(r"<!-- metrics:start.*?<!-- metrics:end -->", lambda _: block, card.read_text(), flags=re.S))


SERVING_START, SERVING_END = "<!-- serving:start", "<!-- serving:end -->"


def write_serving_card(folder: str | Path, block: str, *, heading: str = "## int8 (filled by `edge bench serve`)") -> None:
    """Put ``block`` into CARD.md between ``<!-- serving:start`` and ``<!-- serving:end -->``.

    The first time, the block goes at the top of the ``heading`` section, replacing its
    "Not measured yet" sentence and keeping any other notes below it; later it replaces
    only what is between the markers, so text written by hand around them survives.
    """
    import re

    card = Path(folder) / "CARD.md"
    text = card.read_text() if card.exists() else ""
    wrapped = f"{SERVING_START} (written by edge bench serve --write-card) -->\n{block.rstrip()}\n{SERVING_END}"
    if SERVING_START in text:
        text = re.sub(r"<!-- serving:start.*?<!-- serving:end -->", lambda _: wrapped, text, flags=re.S)
    elif heading in text:
        head, rest = text.split(heading, 1)
        nxt = rest.find("\n## ")
        body, tail = (rest[:nxt], rest[nxt:]) if nxt >= 0 else (rest, "\n")
        # the placeholder sentence goes; any hand-written notes after it stay, below the block
        body = re.sub(r"Not measured yet.*?\.(\s+|$)", "", body, count=1, flags=re.S).strip()
        text = f"{head}{heading}\n{wrapped}\n" + (f"\n{body}\n" if body else "") + tail
    else:
        text = text.rstrip() + f"\n\n{heading}\n{wrapped}\n"
    card.write_text(text)
